"""What an operator reads: text and JSON log lines, the access line of an error, /metrics, the
warnings of deterministic mode (issue 28, item 10)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app as cli
from service.logs import JsonFormatter, TextFormatter

ROW = [0.1, -0.2, 0.3, 0.4]


def record(msg: str, **extra: Any) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "mcserve.access", "levelname": "INFO", "msg": msg, **extra}
    )


def test_text_lines_keep_the_fields() -> None:
    line = TextFormatter().format(record("request", route="/v1/models/{name}:predict", status=422))
    # It was "... INFO mcserve.access request": no route, status or time.
    assert line.endswith('INFO mcserve.access request route="/v1/models/{name}:predict" status=422')


def test_json_lines_drop_uvicorns_color_message() -> None:
    colored = "Uvicorn running on \x1b[1mhttp://127.0.0.1:8080\x1b[0m"
    line = JsonFormatter().format(
        record("Uvicorn running on http://127.0.0.1:8080", color_message=colored)
    )
    assert "color_message" not in json.loads(line) and "\x1b" not in line


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved, level


def test_serve_installs_the_text_formatter(
    root_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` with MCSERVE_LOG_FORMAT=text: the server's one log set-up installs the text
    formatter (its old basicConfig format dropped every field)."""
    started: list[object] = []
    from types import SimpleNamespace

    from service.metrics import Metrics

    app = SimpleNamespace(state=SimpleNamespace(metrics=Metrics()))  # as run() reads it
    monkeypatch.setattr("service.server.create_app", lambda settings: app)
    monkeypatch.setattr("service.server.DrainingServer.run", lambda self: started.append(self))
    res = CliRunner().invoke(cli, ["serve", "--port", "9"], env={"MCSERVE_LOG_FORMAT": "text"})
    assert res.exit_code == 0, res.output
    assert len(started) == 1 and started[0].config.port == 9  # type: ignore[attr-defined]
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, TextFormatter)


async def test_an_errors_access_line_says_why(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcserve.access")
    secret = 9.87654321
    bad = [
        ({"instances": [[secret, 0, 0]]}, "invalid_input"),
        (
            {"instances": [ROW], "parameters": {"samples": "200"}},
            "invalid request: parameters.samples (int_or_auto)",
        ),
    ]
    for body, why in bad:
        caplog.clear()
        r = await client.post("/v1/models/clf:predict", json=body)
        assert r.status_code == 422
        (line,) = [rec for rec in caplog.records if rec.name == "mcserve.access"]
        assert line.__dict__["error"] == why and line.__dict__["status"] == 422
        assert "9.876" not in JsonFormatter().format(line)  # a kind, never the inputs
    caplog.clear()
    assert (
        await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
    ).status_code == 200
    (line,) = [rec for rec in caplog.records if rec.name == "mcserve.access"]
    assert "error" not in line.__dict__


async def test_metrics_have_no_created_series(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
    text = (await client.get("/metrics")).text
    assert "mcserve_requests_total{" in text
    assert "_created" not in text  # every counter and histogram had one


def test_created_series_when_asked() -> None:
    """MCSERVE_METRICS_CREATED=true brings `_created` back (off by default, above)."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    try:
        asked = Metrics(created=True)
        asked.requests.labels("m", "r", "200").inc()
        assert b"mcserve_requests_created{" in generate_latest(asked.registry)
    finally:
        plain = Metrics()  # the switch is process-wide: off again for the other tests
    plain.requests.labels("m", "r", "200").inc()
    assert b"_created" not in generate_latest(plain.registry)


def test_queue_rows_counts_every_version_and_forgets_a_retired_one() -> None:
    """The gauge was bound to the last version attached: the others' queues read 0, and after
    an unload it kept calling (and holding) the retired batcher."""
    from service.metrics import Metrics

    m = Metrics()
    m.add_model("d", "1", "sha256:a", "torch", "cpu", lambda: 5.0)
    m.add_model("d", "2", "sha256:b", "torch", "cpu", lambda: 7.0)
    m.add_model("e", "1", "sha256:c", "torch", "cpu", lambda: 1.0)

    def rows(name: str) -> float | None:
        return m.registry.get_sample_value("mcserve_queue_rows", {"model": name})

    assert (rows("d"), rows("e")) == (12.0, 1.0)
    m.remove_model("d", "2", "sha256:b", "torch", "cpu")
    assert rows("d") == 5.0
    m.remove_model("d", "1", "sha256:a", "torch", "cpu")
    assert (rows("d"), rows("e")) == (None, 1.0)
    # A version moved on disk with new files: the new copy is attached, then the old one freed
    # (lifecycle._moved_away). The old copy's removal took the new one's gauge.
    m.add_model("e", "1", "sha256:d", "torch", "cpu", lambda: 3.0)
    m.remove_model("e", "1", "sha256:c", "torch", "cpu")
    assert rows("e") == 3.0


async def test_deterministic_mode_says_what_it_ignores(client: httpx.AsyncClient) -> None:
    params = {"mode": "deterministic", "samples": 50, "seed": 3, "confidence": 0.9}
    out = (
        await client.post("/v1/models/clf:predict", json={"instances": [ROW], "parameters": params})
    ).json()
    assert (
        "mode=deterministic ignores samples, seed, confidence: dropout is off, one pass is run"
        in out["warnings"]
    )
    v2 = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}],
        "parameters": {"mode": "deterministic", "seed": 3},
    }
    r = await client.post("/v2/models/clf/infer", json=v2)
    assert r.status_code == 200, r.text
    assert "mode=deterministic ignores seed" in r.json()["parameters"]["warnings"]
    plain = {"mode": "deterministic"}
    out = (
        await client.post("/v1/models/clf:predict", json={"instances": [ROW], "parameters": plain})
    ).json()
    assert not any("ignores" in w for w in out["warnings"])
