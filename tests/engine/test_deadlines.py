"""A deadline that passes during compute stops that request's compute (issue: `timeout_ms` bounded
only the queue, and one long request ran for minutes after its client had given up)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from nets import mlp

from service.bundle import load_bundle
from service.engine import MCRequest, MCSampler
from service.engine.compute import STOPPED, Work, run
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import DeadlineExceededError
from service.packaging import save

PAST = -1.0  # seconds from now: a deadline that has passed


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def _sampler() -> MCSampler:
    torch.manual_seed(0)
    return MCSampler(mlp(), torch.zeros(2, 6), device="cpu", row_budget=128)


def test_chunks_of_expired_requests_are_skipped_and_live_ones_keep_their_bits() -> None:
    live = MCRequest(_x(3, 1), 50, seed=7)
    alone = _sampler().run([live])[0]
    s = _sampler()
    dead = MCRequest(_x(8, 2), 100, seed=8, deadline=time.monotonic() + PAST)
    out_dead, out_live = s.run([dead, live])
    # Rows of 128-row chunks: the expired request's 800 (832 with its last 64-row block's
    # padding), then the live one's 150 (192). Chunks 1-6 hold expired rows only and are not
    # run; chunk 7 holds both and runs whole, as does chunk 8.
    assert s.stats.skipped == 6 and s.stats.forwards == 2
    assert np.isnan(out_dead).sum() == 768 * out_dead.shape[-1] and not np.isnan(out_live).any()
    np.testing.assert_array_equal(out_live, alone)  # its chunk shares rows with the expired one
    # A deadline still ahead changes nothing.
    ahead = MCRequest(_x(8, 2), 100, seed=8, deadline=time.monotonic() + 3600)
    s2 = _sampler()
    np.testing.assert_array_equal(
        s2.run([ahead])[0], _sampler().run([MCRequest(_x(8, 2), 100, seed=8)])[0]
    )
    assert s2.stats.skipped == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    torch.manual_seed(0)
    dest = save(
        mlp(d_out=1),
        torch.zeros(4, 6),
        out_dir=tmp_path_factory.mktemp("deadlines"),
        name="reg",
        version="1",
        task="regression",
        target="y",
        intended_use="tests only",
    )
    return ServedModel(load_bundle(dest), device="cpu")


def test_compute_fails_only_the_expired_request_with_504(served: ServedModel) -> None:
    p = PredictParams(samples=200, confidence=(0.9,), seed=3)
    x_live, x_dead = _x(2, 3), _x(50, 4)
    alone = run(served, [Work(x_live, p, served.mc_request(x_live, p))])[0]
    # 50 inputs x 999 passes: about 3 chunks of the served sampler's 16,384 rows.
    dead = MCRequest(x_dead, 999, seed=4, deadline=time.monotonic() + PAST)
    before = served.sampler.stats.skipped
    failed, ok = run(served, [Work(x_dead, p, dead), Work(x_live, p, served.mc_request(x_live, p))])
    assert isinstance(failed, DeadlineExceededError) and str(failed) == STOPPED
    assert served.sampler.stats.skipped >= before + 2
    assert not isinstance(ok, BaseException) and not isinstance(alone, BaseException)
    np.testing.assert_array_equal(ok.summary.mean, alone.summary.mean)  # type: ignore[union-attr]
