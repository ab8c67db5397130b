"""The engine is usable from plain Python: importing it never imports FastAPI."""

from imports import imported_by, under


def test_engine_does_not_import_fastapi() -> None:
    found = imported_by("service.engine", "service.engine.sampler", "service.engine.summaries")
    assert under(found, "fastapi", "starlette") == []
    assert "torch" in found  # the check itself sees what was imported
