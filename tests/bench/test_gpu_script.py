"""bench/gpu.py stays runnable where no GPU is: its checks on CPU, in a bare import context."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    for name in ("breast-cancer", "digits"):
        checks = report["checks"][name]
        # Same device: identical masks and kernels, so the samples agree exactly.
        assert checks["cpu_vs_device"]["max_abs_sample_diff"] == 0.0
        assert checks["batch_independent"]["ok"] is True
        assert [r["batch"] for r in report["speed"][name]["float32"]] == [1, 4]
        assert checks["precision_loss"]["max_abs_probability_diff"] < 0.1
        assert checks["batch_independent_compiled"]["ok"] is True


def test_gpu_script_imports_no_server_stack() -> None:
    code = (
        "import sys, bench.gpu;"
        "bad = [m for m in ('fastapi', 'pydantic', 'onnxruntime') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_script_service_check_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--no-compile"]
    cmd += ["--models", "breast-cancer", "--service", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    service = json.loads(out.read_text())["service"]
    assert set(service) == {"breast-cancer", "diabetes", "digits"}
    for check in service.values():
        assert check["answers_equal_alone_and_shared"] is True
        assert check["forwards_for_24_concurrent"] < 24  # they really shared forwards


def test_gpu_script_times_the_text_model(tmp_path: Path) -> None:
    """Token ids, not floats, for a text model (issue 20 item 8: a session with a GPU can time
    the text model at T = 20 without editing the script)."""
    out = tmp_path / "gpu-text.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--no-compile",
         "--models", "medical-abstracts", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    checks = report["checks"]["medical-abstracts"]
    assert report["ok"] is True and report["passes"] == {"medical-abstracts": 5}
    assert checks["cpu_vs_device"]["max_abs_sample_diff"] == 0.0
    assert checks["batch_independent"]["ok"] is True
    assert [r["batch"] for r in report["speed"]["medical-abstracts"]["float32"]] == [1, 4]
