"""Starting one of the server's child processes (the audit writer, the compute process).

`python -m <module> <fd>`, handed one end of a socket pair, with this package on its path so it
starts from any working directory, as the server did.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])  # the directory holding the `service` package


def spawn(
    module: str, *, new_session: bool = False, pass_fds: list[int] | None = None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the child; returns it and the server's end of its socket. `pass_fds`: other
    descriptors it inherits (same numbers)."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno())],
            pass_fds=[theirs.fileno(), *(pass_fds or [])],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=new_session,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours
