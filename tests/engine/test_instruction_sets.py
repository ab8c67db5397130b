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
Each setting is one pytest run in a subprocess over the determinism tests (about 15 s of CPU each,
measured: both together 32 s wall on the 2 shared cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_determinism_tests_pass_under_forced_instruction_sets(name: str) -> None:
    env = {**os.environ, **SETTINGS[name], "PYTHONPATH": str(ROOT)}
    numpy_targets = _numpy_without_avx512()
    if numpy_targets:
        env["NPY_DISABLE_CPU_FEATURES"] = numpy_targets
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DETERMINISM_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"under {SETTINGS[name]}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    )
