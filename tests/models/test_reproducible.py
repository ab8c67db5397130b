"""`make models` is reproducible: two builds on the same machine, run at the same time, give
identical artifacts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
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
    (models.common.configure_determinism), so together they take the time of one on 2 cores."""
    procs = [
        subprocess.Popen([*cmd, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for out in outs
    ]  # fmt: skip
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return [hashes(out) for out in outs]


def test_two_builds_give_identical_artifacts(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "models.build", "--only", "breast-cancer", "--out-dir"]
    first, second = build_twice(cmd, [tmp_path / "a", tmp_path / "b"])
    assert any(name.endswith("model.onnx") for name in first)
    assert any(name.endswith("weights.safetensors") for name in first)
    assert first == second
