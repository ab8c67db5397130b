"""`make models` is reproducible: two builds on the same machine give identical artifacts."""

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


def test_two_builds_give_identical_artifacts(tmp_path: Path) -> None:
    results = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "models.build",
                "--only",
                "breast-cancer",
                "--out-dir",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results.append(hashes(out))
    first, second = results
    assert any(name.endswith("model.onnx") for name in first)
    assert any(name.endswith("weights.safetensors") for name in first)
    assert first == second
