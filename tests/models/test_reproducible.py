"""`make models` is reproducible: two builds on the same machine, run at the same time, give
identical artifacts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hashes(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def build_twice(cmd: list[str], outs: list[Path]) -> list[dict[str, str]]:
    """Both builds at once, each writing to its own directory: a build runs on one thread
    (models.common.configure_determinism), so together they take the time of one on 2 cores.
    What running them one after the other also checked stays checked: the second starts 2 s
    later (a clock read into an artifact differs) and with an empty numba cache of its own (it
    compiles the mask kernels that the first may load from the repository's cache)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for k, out in enumerate(outs):
            env = dict(os.environ)
            if k:
                time.sleep(2.0)
                env["NUMBA_CACHE_DIR"] = str(out.with_name(out.name + "-numba"))
            log = out.with_name(out.name + ".log")
            with log.open("wb") as f:
                proc = subprocess.Popen([*cmd, str(out)], cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT)  # fmt: skip
            procs.append((proc, log))
        for proc, log in procs:
            assert proc.wait(timeout=300) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [hashes(out) for out in outs]


def test_two_builds_give_identical_artifacts(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "models.build", "--only", "breast-cancer", "--out-dir"]
    first, second = build_twice(cmd, [tmp_path / "a", tmp_path / "b"])
    assert any(name.endswith("model.onnx") for name in first)
    assert any(name.endswith("weights.safetensors") for name in first)
    assert first == second
