"""Write requirements.lock: every distribution the image installs, at the version installed here.

    python deploy/lock.py > requirements.lock      (from the environment `make venv` made)

The set is pyproject.toml's runtime dependencies and theirs, extras and markers applied for this
interpreter (CPython 3.11 on Linux, as in the image), each pinned `==` to the version installed
in this environment, except torch itself: its build (CPU or CUDA) comes from its own index and
its pin is the Dockerfile's TORCH_SPEC (`torch==2.13.0`), checked against this environment's
torch by the tests. The Dockerfile installs exactly these (`--no-deps`), then `pip check`s the
whole; tests/deploy/test_dockerfile.py checks the lock against this environment.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The image's Python packages, exact: pyproject.toml's runtime dependencies and theirs, as
# installed where this file was written (CPython 3.11, Linux), torch aside (the Dockerfile's
# TORCH_SPEC pins it). Written by deploy/lock.py; the Dockerfile installs exactly these.
# Change a dependency, then rewrite this file: python deploy/lock.py > requirements.lock
"""


def closure() -> dict[str, str]:
    """{canonical name: installed version} of the runtime dependencies and theirs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, str] = {}
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(req.name)  # not installed: an error, not a guess
        found[key[0]] = dist.version
        for spec in map(Requirement, dist.requires or []):
            extras = req.extras or {""}
            if spec.marker is None or any(spec.marker.evaluate({"extra": e}) for e in extras):
                todo.append(spec)
    return found


def public(version: str) -> str:
    """The version without its local label: '2.13.0+cpu' -> '2.13.0'."""
    return Version(version).public


UNLOCKED = {"torch"}  # pinned by the Dockerfile's TORCH_SPEC, from the build's own index


def lock_text() -> str:
    pins = sorted((n, v) for n, v in closure().items() if n not in UNLOCKED)
    return HEADER + "".join(f"{name}=={public(v)}\n" for name, v in pins)


if __name__ == "__main__":
    sys.stdout.write(lock_text())
