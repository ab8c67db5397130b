"""A PostgreSQL server for the audit tests, found or started; never a silent skip.

- MCSERVE_TEST_POSTGRES_URL set (what .ci/run does): that server; unreachable is a FAILURE.
- unset, with PostgreSQL's server binaries installed (`initdb`, `postgres`): a throwaway server
  in a temporary directory on a free 127.0.0.1 port, stopped at the end, and by the kernel if
  the test process is killed (as the `postgres` user when run as root: initdb refuses root).
- neither: a failure whose message says how to run the tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
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
    "PostgreSQL's server (initdb, postgres) so that the tests start a throwaway one"
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


def _clean_stale(prefix: str) -> None:
    """Remove throwaway directories left by a killed run (no live server, over 10 minutes old)."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")):
        pid_file = Path(d, "data", "postmaster.pid")
        try:
            if pid_file.exists():
                os.kill(int(pid_file.read_text().split()[0]), 0)
                continue  # a live server: someone's run
            if time.time() - os.path.getmtime(d) < 600:
                continue  # perhaps still being initialised
        except ProcessLookupError:
            pass
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def throwaway() -> Iterator[str]:
    """initdb + postgres in the foreground; `setpriv --pdeathsig` stops the server even when the
    test process is killed."""
    initdb = _tool("initdb")
    if initdb is None:
        raise RuntimeError(f"{ENV} is not set and PostgreSQL is not installed: {HOW}")
    postgres = str(Path(os.path.realpath(initdb)).parent / "postgres")
    prefix = "mcserve-pg-"
    _clean_stale(prefix)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    wrap: list[str] = []
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0:  # initdb refuses root: run as the postgres user
        if setpriv is None:
            raise RuntimeError(
                f"running as root needs setpriv (util-linux) to drop to postgres: {HOW}"
            )
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        wrap = [setpriv, "--reuid", "postgres", "--regid", "postgres", "--init-groups"]
    elif setpriv is not None:
        wrap = [setpriv]
    if wrap:
        wrap += ["--pdeathsig", "SIGQUIT", "--"]
    data, port = root / "data", _free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [*wrap, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cmd = [postgres, "-D", str(data), "-p", str(port), "-k", str(root)]
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        with (root / "log").open("wb") as log:
            proc = subprocess.Popen([*wrap, *cmd], stdout=log, stderr=subprocess.STDOUT)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                check(url)
                break
            except RuntimeError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (root / "log").read_text(errors="replace")
                    raise RuntimeError(
                        f"the throwaway PostgreSQL did not start:\n{log_text}"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing to keep
            proc.wait(30)
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
