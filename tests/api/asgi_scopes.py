"""ASGI scopes for tests that drive the app by hand (a module of its own: several test
folders have a conftest, so `from conftest import` is ambiguous)."""

from __future__ import annotations

from typing import Any


def predict_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI scope for POST /v1/models/clf:predict, for tests that drive the app by hand."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models/clf:predict",
        "raw_path": b"/v1/models/clf:predict",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "headers": headers,
    }
