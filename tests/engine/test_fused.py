"""The numba mask kernel gives the torch path's numbers bit for bit (fused.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import FOUR_MODEL_IDS, FOUR_MODELS, Residual, mlp
from torch import nn

from service.engine import MCRequest, MCSampler, fused
from service.engine.fused import MaskRows, apply_mask
from service.engine.masks import KeepRule, counter_base, signed_key


def _mask_rows(rows: int, mask_shape: tuple[int, ...], p: float, seed: int) -> MaskRows:
    g = torch.Generator().manual_seed(seed)
    # Rows from several requests: their own seeds (keys of either sign), passes and inputs.
    seeds = torch.randint(0, 4, (rows,), generator=g).tolist()
    keys = torch.tensor([signed_key([0, 1, 2**40 + 3, 2**63 - 1][s], s % 3) for s in seeds])
    t = torch.randint(0, 1000, (rows,), generator=g)
    i = torch.randint(0, 1024, (rows,), generator=g)
    return MaskRows(keys, counter_base(t, i), KeepRule(p).threshold, mask_shape)


@pytest.fixture(params=["serial", "parallel"])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both compiled variants: on the calling thread and over numba's threads."""
    parallel = request.param == "parallel"
    monkeypatch.setattr(fused, "PARALLEL_MIN_ELEMENTS", 0 if parallel else 1 << 62)
    if parallel:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    return str(request.param)


@pytest.mark.parametrize("features", [1, 7, 8, 13, 128, 300])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_elementwise_kernel_equals_torch_path(features: int, p: float, threads: str) -> None:
    assert fused.kernels() is not None  # numba is a dependency: the kernel really runs
    mask = _mask_rows(37, (features,), p, seed=features)
    x = torch.randn(37, features, generator=torch.Generator().manual_seed(1)) * 3
    scale = KeepRule(p).scale
    got = apply_mask(x, mask, scale)
    want = x.mul(mask.keep()).mul_(scale)
    assert torch.equal(got, want)
    kept = (got != 0).float().mean().item()
    # The keep rate is the quantised keep probability within 5 binomial standard errors.
    q = KeepRule(p).keep_prob
    assert abs(kept - q) <= 5 * np.sqrt(q * (1 - q) / got.numel()) + 1 / got.numel()


def test_channel_kernel_equals_torch_path(threads: str) -> None:
    mask = _mask_rows(41, (5, 1, 1), 0.5, seed=3)
    x = torch.randn(41, 5, 3, 4, generator=torch.Generator().manual_seed(2))
    got = apply_mask(x, mask, 2.0)
    assert torch.equal(got, x.mul(mask.keep()).mul_(2.0))
    # Whole channels: every position of a channel is kept or dropped together.
    zero = (got == 0).flatten(2)
    assert torch.equal(zero.all(2), zero.any(2))


def test_non_contiguous_and_float64_inputs_take_a_correct_path() -> None:
    mask = _mask_rows(16, (12,), 0.25, seed=4)
    base = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    x = base.t()  # not contiguous
    assert torch.equal(apply_mask(x, mask, 1.5), x.mul(mask.keep()).mul_(1.5))
    x64 = x.double()  # not the kernel's dtype: the torch path
    assert torch.equal(apply_mask(x64, mask, 1.5), x64.mul(mask.keep()).mul_(1.5))


@pytest.mark.parametrize("make, shape", FOUR_MODELS, ids=FOUR_MODEL_IDS)
def test_sampler_fused_equals_torch_masks(make, shape) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(9, *shape, generator=torch.Generator().manual_seed(6))
    on = MCSampler(model, x, device="cpu")
    off = MCSampler(model, x, device="cpu", fused=False)
    assert on.fused and not off.fused
    reqs = [MCRequest(x.numpy(), 30, seed=1), MCRequest(x[:4].numpy(), 70, seed=2**63 - 1)]
    for a, b in zip(on.run(reqs), off.run(reqs), strict=True):
        assert np.array_equal(a, b)
    # A prefix value used only by a dropout is read in place by the kernel (no gathered copy);
    # the residual's z is also added after the dropout, so it must be gathered.
    in_place = [s for s in on.graph.frontier_site if s is not None]
    assert in_place == ([] if isinstance(model, Residual) else [0])


def test_kernel_reads_rows_in_place(threads: str) -> None:
    for shape, x in (((10,), torch.randn(6, 10)), ((3, 1, 1), torch.randn(6, 3, 2, 2))):
        mask = _mask_rows(25, shape, 0.4, seed=8)
        rows = torch.randint(0, 6, (25,), generator=torch.Generator().manual_seed(9))
        got = apply_mask(x, MaskRows(mask.keys, mask.base, mask.threshold, shape, rows), 1.25)
        want = x.index_select(0, rows).mul(mask.keep()).mul_(1.25)
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_without_numba_the_torch_path_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(0.25)
    x = torch.randn(5, 6)
    want = MCSampler(model, x, device="cpu").run([MCRequest(x.numpy(), 20, seed=9)])[0]
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_kernel_failed", True)  # as after a failed `import numba`
    sampler = MCSampler(model, x, device="cpu")
    assert not sampler.fused
    assert np.array_equal(sampler.run([MCRequest(x.numpy(), 20, seed=9)])[0], want)
    mask = _mask_rows(8, (6,), 0.25, seed=1)
    assert torch.equal(
        apply_mask(x[:1].repeat(8, 1), mask, 2.0), x[:1].repeat(8, 1).mul(mask.keep()).mul_(2.0)
    )


def test_fused_refuses_compile_mode() -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        MCSampler(mlp(0.25), torch.randn(2, 6), device="cpu", fused=True, compile_mode="default")


@pytest.mark.parametrize("fault", ["raises", "wrong numbers"])
def test_a_kernel_that_fails_its_check_leaves_the_torch_path(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a kernel numba cannot compile on some machine, or one that computes something else,
    # must do: the model still loads and answers, with the torch path's numbers.
    model = mlp(0.25)
    x = torch.randn(5, 6)
    want = MCSampler(model, x, device="cpu", fused=False).run([MCRequest(x.numpy(), 20, 4)])[0]

    def broken(x, src, keys, base, threshold, scale, out):  # type: ignore[no-untyped-def]
        if fault == "raises":
            raise RuntimeError("no compiler for this CPU")
        out[:] = 1.0
        return out

    monkeypatch.setattr(fused, "_kernels", fused.Kernels(broken, broken, broken, broken))
    monkeypatch.setattr(fused, "_verified", {})
    sampler = MCSampler(model, x, device="cpu")
    assert not sampler.fused
    assert np.array_equal(sampler.run([MCRequest(x.numpy(), 20, 4)])[0], want)


class ParameterDropout(nn.Module):
    """Dropout on a parameter: one row broadcast over every (pass, input) row."""

    def __init__(self, d: int = 40) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, d, generator=torch.Generator().manual_seed(3)))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.drop(self.pos)).sum(1, keepdim=True)


def test_a_dropout_input_that_broadcasts_takes_the_torch_path() -> None:
    # The kernel reads one input row per mask row without bounds checks: a [1, D] parameter
    # under [rows, D] masks read past its end (NaN answers; a segfault at 16,384 x 4,096).
    model = ParameterDropout()
    x = torch.randn(6, 40)
    on = MCSampler(model, x, device="cpu")
    off = MCSampler(model, x, device="cpu", fused=False)
    req = [MCRequest(x.numpy(), 50, seed=1)]
    a, b = on.run(req)[0], off.run(req)[0]
    assert np.isfinite(a).all()
    assert np.array_equal(a, b)
    mask = _mask_rows(30, (40,), 0.5, seed=2)
    pos = model.pos.detach()
    assert torch.equal(apply_mask(pos, mask, 2.0), pos.mul(mask.keep()).mul_(2.0))
    bad_rows = MaskRows(mask.keys, mask.base, mask.threshold, (40,), torch.full((30,), 5))
    with pytest.raises(IndexError):  # an index past the input: torch's error, not a wild read
        apply_mask(pos, bad_rows, 2.0)


# A fresh process: are the four kernels checked against the torch path, and how many of them
# came from numba's disk cache? PATCH runs first (e.g. to take every cache directory away).
PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
{patch}
from service.engine import fused
ks = fused.kernels()
print(json.dumps([fused.verified(True), [sum(k.stats.cache_hits.values()) for k in ks]]))
"""


def _probe(tmp_path: Path, patch: str = "") -> tuple[bool, list[int], str]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", PROBE.format(patch=patch)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, hits = json.loads(proc.stdout.splitlines()[-1])
    return ok, hits, proc.stderr


def test_a_later_process_loads_the_kernels_from_the_disk_cache(tmp_path: Path) -> None:
    """Each process compiled the kernels (about 2 s) before they were cached on disk."""
    first = _probe(tmp_path)
    second = _probe(tmp_path)
    assert first[:2] == (True, [0, 0, 0, 0])
    assert second[:2] == (True, [1, 1, 1, 1])  # the serial builds loaded their own entries


def test_without_a_writable_cache_the_kernels_compile_in_each_process(tmp_path: Path) -> None:
    patch = "from numba.core import caching; caching.CacheImpl._locator_classes = []"
    ok, hits, log = _probe(tmp_path, patch)
    assert (ok, hits) == (True, [0, 0, 0, 0])
    assert "numba cannot cache the mask kernels here" in log
    assert not (tmp_path / "numba").exists()


def test_kernels_whose_constants_differ_from_masks_py_are_not_used(tmp_path: Path) -> None:
    """numba reads only mask_kernels.py to tell a cache is stale: its constants are copies,
    checked against masks.py's, so a change in one place only cannot serve cached masks."""
    code = (
        "from service.engine import masks; masks.GAMMA ^= 1; from service.engine import fused; "
        "print(fused.kernels() is None, fused.verified(False))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "False"]
    assert "constants differ from masks.py's" in proc.stderr
