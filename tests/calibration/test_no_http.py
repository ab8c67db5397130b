"""service.calibration is usable from plain Python: it never imports FastAPI or matplotlib
(matplotlib only once a report is drawn)."""

from imports import imported_by, under


def test_calibration_does_not_import_fastapi_or_matplotlib() -> None:
    found = imported_by(
        "service.calibration.data",
        "service.calibration.recalibration",
        "service.calibration.evaluation",
        "service.calibration.report",
    )
    assert under(found, "fastapi", "starlette", "matplotlib") == []
    assert "service.calibration.report" in found
