"""The audit package is plain Python: importing it never imports FastAPI or Starlette, and the
writer process (service.audit.sink) does not import torch either (it starts fast and small)."""

from imports import imported_by, under


def test_audit_does_not_import_fastapi() -> None:
    found = imported_by(
        "service.audit.record",
        "service.audit.store",
        "service.audit.writer",
        "service.audit.replay",
        "service.audit.metrics",
        "service.audit.cli",
    )
    assert under(found, "fastapi", "starlette") == []


def test_writer_process_does_not_import_torch() -> None:
    found = imported_by("service.audit.sink")
    assert under(found, "torch", "fastapi", "starlette", "pydantic", "service.engine") == []
    assert "service.audit.store" in found  # the check itself sees what was imported
