"""A deadline that passes, or a client that goes, during compute stops that request's compute
(`timeout_ms` bounded only the queue, and one long request ran for minutes after its client had
given up)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import mlp

from service.bundle import load_bundle
from service.engine import MCRequest, MCSampler
from service.engine.cancels import SLOTS, Flags
from service.engine.compute import GONE, STOPPED, Work, run
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import CancelledError, DeadlineExceededError
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


def regressor(out_dir: Path) -> ServedModel:
    """A served six-feature MLP regressor (also test_turns.py's tabular model)."""
    torch.manual_seed(0)
    dest = save(
        mlp(d_out=1),
        torch.zeros(4, 6),
        out_dir=out_dir,
        name="reg",
        version="1",
        task="regression",
        target="y",
        intended_use="tests only",
    )
    return ServedModel(load_bundle(dest), device="cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    return regressor(tmp_path_factory.mktemp("deadlines"))


def test_compute_fails_only_the_expired_request_with_504(served: ServedModel) -> None:
    p = PredictParams(samples=200, confidence=(0.9,), seed=3)
    x_live, x_dead = _x(2, 3), _x(50, 4)
    alone = run(served, [Work(x_live, p, served.mc_request(x_live, p))])[0]
    # 50 inputs x 999 passes: about 3 chunks of the served sampler's 16,384 rows.
    dead = MCRequest(x_dead, 999, seed=4, deadline=time.monotonic() + PAST)
    before = served.sampler.stats.skipped
    failed, ok = run(served, [Work(x_dead, p, dead), Work(x_live, p, served.mc_request(x_live, p))])
    assert isinstance(failed, DeadlineExceededError) and failed.what == STOPPED
    assert served.sampler.stats.skipped >= before + 2
    assert not isinstance(ok, BaseException) and not isinstance(alone, BaseException)
    np.testing.assert_array_equal(ok.summary.mean, alone.summary.mean)  # type: ignore[union-attr]


def test_a_flag_set_by_the_server_is_read_by_another_process() -> None:
    flags = Flags()
    try:
        a, b = flags.take(), flags.take()
        assert not a.is_set() and not b.is_set()
        flags.set(a)
        assert a.is_set() and not b.is_set()
        # The compute process maps the descriptor it inherits (compute_child.py's hello).
        code = "import pickle, sys; from service.engine import cancels; " + (
            "cancels.attach(sys.argv[1], int(sys.argv[2])); "
            "print([f.is_set() for f in pickle.loads(bytes.fromhex(sys.argv[3]))])"
        )
        args = [flags.key, str(flags.fd), pickle.dumps([a, b]).hex()]
        got = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True, text=True, check=True, pass_fds=[flags.fd],
        )  # fmt: skip
        assert got.stdout.strip() == "[True, False]"
    finally:
        flags.close()
    assert not a.is_set()  # the server stopped: nothing to cancel


def test_a_late_cancel_never_stops_the_request_that_took_its_slot() -> None:
    flags = Flags()
    try:
        first = flags.take()
        for _ in range(SLOTS - 1):
            flags.take()
        second = flags.take()  # the ring came round: the same slot, the next mark
        assert (second.slot, second.mark) == (first.slot, first.mark + 1)
        flags.set(first)  # the first request's client goes only now
        assert not second.is_set()
    finally:
        flags.close()


def test_compute_stops_a_request_whose_client_went(served: ServedModel) -> None:
    flags = Flags()
    try:
        gone = flags.take()
        flags.set(gone)
        p = PredictParams(samples=200, confidence=(0.9,), seed=3)
        req = MCRequest(_x(50, 5), 999, seed=5, cancel=gone)
        before = served.sampler.stats.skipped
        (out,) = run(served, [Work(req.x, p, req)])
        assert isinstance(out, CancelledError) and str(out) == GONE
        assert served.sampler.stats.skipped >= before + 2
    finally:
        flags.close()


def test_a_deadline_error_keeps_its_parts_across_the_compute_process() -> None:
    """Errors come back from the compute process pickled: the message once, its parts kept."""
    err = DeadlineExceededError(STOPPED)
    back = pickle.loads(pickle.dumps(err))
    assert (back.what, back.hint, str(back)) == (STOPPED, err.hint, str(err))
    assert str(back).count(DeadlineExceededError.HINT) == 1
