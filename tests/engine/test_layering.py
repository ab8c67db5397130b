"""The engine is usable from plain Python: importing it never imports FastAPI."""

import subprocess
import sys


def test_engine_does_not_import_fastapi() -> None:
    code = (
        "import sys, service.engine, service.engine.sampler, service.engine.summaries;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
