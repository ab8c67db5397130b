"""service.calibration is usable from plain Python: it never imports FastAPI or matplotlib
(matplotlib only once a report is drawn)."""

import subprocess
import sys


def test_calibration_does_not_import_fastapi_or_matplotlib() -> None:
    code = (
        "import sys, service.calibration.calibrator, service.calibration.recalibration,"
        " service.calibration.evaluation, service.calibration.report;"
        "bad = [m for m in sys.modules"
        " if m.split('.')[0] in ('fastapi', 'starlette', 'matplotlib')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
