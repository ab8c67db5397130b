"""A PostgreSQL server for the audit tests, found or started; never a silent skip.

- MCSERVE_TEST_POSTGRES_URL set (what .ci/run does): that server; unreachable is a FAILURE.
- unset, with PostgreSQL's `initdb` and `pg_ctl` installed: a throwaway server in a temporary
  directory on a free 127.0.0.1 port, stopped at the end (as the `postgres` user when run as
  root, which initdb refuses to be).
- neither: a failure whose message says how to run the tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

ENV = "MCSERVE_TEST_POSTGRES_URL"
HOW = (
    "the audit tests need PostgreSQL: run `bash .ci/run` (installs it from Debian's packages, "
    "starts it on 127.0.0.1 and sets MCSERVE_TEST_POSTGRES_URL), or set "
    "MCSERVE_TEST_POSTGRES_URL=postgresql://user:password@127.0.0.1:5432/db yourself, or install "
    "PostgreSQL (initdb and pg_ctl) so that the tests start a throwaway server"
)


def check(url: str) -> None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise RuntimeError(f"{ENV} is set but the server does not answer: {exc}") from exc


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway() -> Iterator[str]:
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError(f"{ENV} is not set and PostgreSQL is not installed: {HOW}")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="mcserve-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                check(url)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def server() -> Iterator[str]:
    url = os.environ.get(ENV)
    if url:
        check(url)
        yield url
        return
    with throwaway() as url:
        yield url


def with_schema(url: str, schema: str) -> str:
    """The URL with `search_path` set to `schema` (one schema per test: isolation)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"
