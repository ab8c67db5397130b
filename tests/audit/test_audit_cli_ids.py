"""`audit show ID`: a record id always reaches its record, whatever X-Request-ID clients sent; a
request id reaches its record when it names one; anything else is an exact error, never a
traceback (`show ²` crashed: str.isdigit takes superscripts, int() does not)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from audit_support import Backend, serving
from typer.testing import CliRunner

from service.audit.store import is_record_id
from service.cli import app as cli

BODY = {"instances": [[0.1, 0.2, 0.3, 0.4]], "parameters": {"seed": 1}}


def test_what_is_written_as_a_record_id() -> None:
    assert is_record_id("1") and is_record_id("0") and is_record_id(str(2**63 - 1))
    for key in ("²", "0002", "-1", "1.0", " 1", str(2**63), "", "١"):  # "١": Arabic-Indic one
        assert not is_record_id(key), key


async def test_show_by_record_id_and_by_request_id(
    backend: Backend, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(repo, **backend.settings) as (app, client):
        first = await client.post("/v1/models/clf:predict", json=BODY)  # a generated request id
        for rid in ["1", "0002"] + ["again"] * 22:
            r = await client.post(
                "/v1/models/clf:predict", json=BODY, headers={"X-Request-ID": rid}
            )
            assert r.status_code == 200
        assert await app.state.audit.flush(10)
        ids = {rid: [rec.id for rec in app.state.audit.store.find(rid)] for rid in ("1", "0002")}
    one = min(ids["1"])  # record 1 (the first) and the record whose request id is "1"
    [named_one] = [i for i in ids["1"] if i != one]
    for k, v in backend.settings.items():
        monkeypatch.setenv(f"MCSERVE_{k.upper()}", str(v))
    runner = CliRunner()

    shown = runner.invoke(cli, ["audit", "show", "1"])
    assert shown.exit_code == 0, shown.output  # was: "'1' matches records 1, 2" (exit 2)
    doc = orjson.loads(shown.stdout)
    assert doc["id"] == 1 and doc["request_id"] == first.headers["x-request-id"]
    assert shown.stderr == (
        f"note: '1' is record 1; it is also the request id of records {named_one} (give one "
        "of those ids to see it)\n"
    )
    by_id = orjson.loads(runner.invoke(cli, ["audit", "show", str(named_one)]).stdout)
    assert by_id["request_id"] == "1"
    padded = runner.invoke(cli, ["audit", "show", "0002"])  # a request id, not record 2
    assert padded.exit_code == 0 and orjson.loads(padded.stdout)["id"] == ids["0002"][0]

    sup = runner.invoke(cli, ["audit", "show", "²"])
    assert sup.exit_code == 2, sup.output  # was a ValueError's traceback
    assert sup.stderr.startswith("error: no audit record with id or request id '²' in ")

    many = runner.invoke(cli, ["audit", "show", "again"])
    assert many.exit_code == 2
    listed = many.stderr.split("names records ", 1)[1].split(":", 1)[0]
    assert listed.endswith(" and more") and len(listed.split(", ")) == 20  # a bounded listing
    assert "give the record id" in many.stderr

    replayed = runner.invoke(cli, ["audit", "replay", "1", "--model-dir", str(repo)])
    assert replayed.exit_code == 0 and replayed.stdout.startswith("bit-identical: record 1 ")
