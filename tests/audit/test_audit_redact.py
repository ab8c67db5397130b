"""No audit store password reaches a log, a message or /metrics: neither the URL's user:password
part nor a password libpq takes from its query string (?password=, ?sslpassword=)."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest
from audit_support import pg_backend, serving

from service.audit.backend import open_store
from service.audit.postgres import redact
from service.audit.store import StoreError


def test_redact_hides_every_password() -> None:
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    url = "postgresql://u@h/db?password=s3cret&options=-csearch_path%3Da&sslpassword=k3y"
    shown = redact(url)
    assert "s3cret" not in shown and "k3y" not in shown
    assert shown == ("postgresql://u@h/db?password=***&options=-csearch_path%3Da&sslpassword=***")
    both = redact("postgresql://u:one@h/db?PASSWORD=two")
    assert "one" not in both and "two" not in both
    assert redact("postgresql://u@h/db?sslmode=require") == "postgresql://u@h/db?sslmode=require"
    # A port that is not a number made urlsplit raise: the message then crashed, with the URL.
    odd = redact("postgresql://u:pw@h:port/db?password=s3cret")
    assert "pw" not in odd and "s3cret" not in odd and odd.startswith("postgresql://")


def test_a_refused_url_is_named_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        open_store("mysql://u@h/db?password=s3cret", tmp_path / "unused.db")
    assert "s3cret" not in caught.value.message and "password=***" in caught.value.message


def test_a_keyword_string_is_never_echoed(tmp_path: Path) -> None:
    """libpq's keyword form (what psycopg.connect also takes) was quoted whole, password and
    all, in the start-up error."""
    dsn = "host=127.0.0.1 user=u password=hunter2-s3cret dbname=db"
    with pytest.raises(StoreError) as caught:
        open_store(dsn, tmp_path / "unused.db")
    assert "hunter2-s3cret" not in caught.value.message
    assert "must be a postgresql:// URL" in caught.value.message
    assert "hunter2-s3cret" not in redact(dsn)
    assert "k3y" not in redact("host=h sslpassword=k3y")


def test_the_store_is_described_by_its_url_alone(postgres: str) -> None:
    for backend in pg_backend(postgres):
        with backend.open() as store:
            assert store.description.startswith("postgresql://")  # was postgresql:postgresql://


async def test_a_query_string_password_is_not_logged(
    postgres: str, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for backend in pg_backend(postgres):
        parts = urlsplit(backend.settings["audit_url"])
        secret = parts.password or "an-unused-s3cret"  # trust authentication ignores it
        netloc = parts.netloc.split("@", 1)[1]
        query = f"{parts.query}&{urlencode({'password': secret})}"
        url = urlunsplit(parts._replace(netloc=f"{parts.username}@{netloc}", query=query))
        with caplog.at_level(logging.DEBUG):
            async with serving(repo, audit_url=url) as (app, client):
                r = await client.post("/v1/models/clf:predict", json={"instances": [[0, 0, 0, 0]]})
                assert r.status_code == 200
                assert await app.state.audit.flush(10)
                description = app.state.audit.description
                metrics = (await client.get("/metrics")).text
        assert f"password={secret}" not in description and "password=***" in description
        logged = [
            f"{r.getMessage()} {getattr(r, 'store', '')}" for r in caplog.records
        ]  # the start-up line names the store
        assert any("password=***" in line for line in logged), logged
        assert not [line for line in logged if f"password={secret}" in line]
        assert f"password={secret}" not in metrics
