"""The audit package is plain Python: importing it never imports FastAPI or Starlette, and the
writer process (service.audit.sink) does not import torch either (it starts fast and small)."""

import subprocess
import sys


def test_audit_does_not_import_fastapi() -> None:
    code = (
        "import sys, service.audit.record, service.audit.store, service.audit.writer,"
        " service.audit.replay, service.audit.metrics, service.audit.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_writer_process_does_not_import_torch() -> None:
    code = (
        "import sys, service.audit.sink;"
        "bad = [m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'fastapi', 'starlette', 'pydantic') or m.startswith('service.engine')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
