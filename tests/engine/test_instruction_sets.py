"""The determinism tests again, under forced instruction-set settings (issue 23).

A seeded answer must not depend on what shares its forward, whichever kernels the libraries
dispatch. Wider vector units (an AVX-512 Xeon) took kernels the development machines never ran,
and `make test` failed there only; these switches make the libraries take other kernels here.
Measured on an AMD EPYC (2026-12-06) by hashing each library's output with and without the
setting: MKL ignores `MKL_ENABLE_INSTRUCTIONS` on AMD but changes its sgemm under
`MKL_CBWR=COMPATIBLE`; oneDNN's convolutions change under `ONEDNN_MAX_CPU_ISA`; ATen's under
`ATEN_CPU_CAPABILITY=default` (`avx2` changed none of the kernels probed); numpy's exp and log
under `NPY_DISABLE_CPU_FEATURES` naming its AVX-512 targets. On an Intel CPU
`MKL_ENABLE_INSTRUCTIONS=AVX2` is the setting that made the old row layout fail.
Each setting is one pytest run in a subprocess over the determinism tests (about 15 s of CPU each).
Both start together, each in its own --basetemp: one after the other they took 32 s of wall time on
the 2 shared cores, since each keeps about one core busy.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import STDOUT, Popen

import pytest

ROOT = Path(__file__).resolve().parents[2]

DETERMINISM_TESTS = [
    "tests/engine/test_blocks.py",
    "tests/engine/test_text_determinism.py",
    "tests/engine/test_variational_masks.py::test_variational_lstm_alone_shared_reordered_and_replayed",
    "tests/engine/test_sampler.py::test_seeded_requests_share_forward_and_match_alone",
    "tests/engine/test_sampler.py::test_chunking_does_not_change_results",
    "tests/api/test_batching.py::test_concurrent_seeded_requests_share_forwards",
    "tests/bench/test_gpu_script.py::test_gpu_script_service_check_on_cpu",
    "tests/audit/test_audit_replay.py::test_replay_is_bit_identical[sqlite]",
]


def _numpy_without_avx512() -> str:
    """numpy's AVX-512 dispatch targets present in this build (naming others is an error)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__  # type: ignore[attr-defined]

    return ",".join(t for t in ("X86_V4", "AVX512_ICL", "AVX512_SPR") if t in __cpu_dispatch__)


SETTINGS = {
    # The oldest kernels each library has: MKL's SSE2 path, ATen without vectors, oneDNN SSE4.1.
    "narrow": {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
    # AVX2 everywhere (what an AVX-512 machine's libraries do when told so).
    "avx2": {
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Popen[str], Path]]]:
    """Every setting's pytest run, started at once; each test waits for its own."""
    numpy_targets = _numpy_without_avx512()
    started: dict[str, tuple[Popen[str], Path]] = {}
    try:
        for name, setting in SETTINGS.items():
            env = {**os.environ, **setting, "PYTHONPATH": str(ROOT)}
            if numpy_targets:
                env["NPY_DISABLE_CPU_FEATURES"] = numpy_targets
            tmp = tmp_path_factory.mktemp(name)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            cmd += ["--basetemp", str(tmp / "pytest"), *DETERMINISM_TESTS]
            log = tmp / "log.txt"
            with log.open("w") as out:  # its own session: ended with what it started
                proc = Popen(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=STDOUT, text=True,
                    start_new_session=True,
                )  # fmt: skip
            started[name] = (proc, log)
        yield started
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_determinism_tests_pass_under_forced_instruction_sets(
    name: str, runs: dict[str, tuple[Popen[str], Path]]
) -> None:
    proc, log = runs[name]
    assert proc.wait(timeout=300) == 0, f"under {SETTINGS[name]}:\n{log.read_text()[-6000:]}"
