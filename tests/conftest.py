"""Shared fixtures: a session-wide repository of tiny bundles (built once, ~2 s)."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Compute on the server's thread unless a test asks for the compute process: most tests start an
# app or a server of their own, and a compute process adds about 2 s to each start. The process is
# tested in tests/api/test_compute_process.py and by the end-to-end tests, which set this to true.
os.environ.setdefault("MCSERVE_COMPUTE_PROCESS", "false")

# Tests import shared helpers (tests/nets.py, tests/server.py) by module name.
sys.path.insert(0, str(Path(__file__).parent))

from nets import mlp

from service.packaging import save

FEATURES = ["f0", "f1", "f2", "f3"]


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=4, hidden=16, d_out=3),
        torch.randn(4, 4),
        out_dir=root,
        name="clf",
        version="1",
        task="classification",
        intended_use="tests only",
        labels=["red", "green", "blue"],
        feature_names=FEATURES,
        units=["cm", None, None, None],
        valid_ranges=[(-10.0, 10.0)] * 4,
        training_ranges=[(-3.0, 3.0)] * 4,
    )
    save(
        mlp(0.25, d_in=3, hidden=16, d_out=1),
        torch.randn(4, 3),
        out_dir=root,
        name="reg",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        noise_var=0.25,
    )
    return root
