"""Structured JSON logs: one object per line, with the fields passed as `extra`.

Never log request bodies (inputs), API keys or tokens: the access line carries ids, model,
status and timings only.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Not fields: the record's own attributes, and uvicorn's `color_message` (the message again,
# with terminal colour escapes).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra` fields a record was logged with."""
    attrs = record.__dict__
    # Set difference in C: cheap on every request.
    return {k: attrs[k] for k in attrs.keys() - _STANDARD if not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """One line for a person: time, level, logger, message, then the fields as key=value (the
    access line's route, status and timings were dropped by a plain format string)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        if not extra:
            return line
        pairs = " ".join(
            f"{k}={orjson.dumps(v, default=str).decode()}" for k, v in sorted(extra.items())
        )
        head, sep, trace = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {pairs}{sep}{trace}"


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route mcserve's and uvicorn's loggers through one handler on stderr, JSON or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
