"""The counter-based mask generator: reference values, backends agree, rate and independence."""

from __future__ import annotations

import math

import numpy as np
import torch

from service.engine.masks import (
    GAMMA,
    MASK64,
    PASS_SHIFT,
    ROW_SHIFT,
    KeepRule,
    keep_bytes,
    keep_bytes_numpy,
    layer_key,
    mix64,
)

CPU = torch.device("cpu")


def test_mix64_matches_splitmix64_reference() -> None:
    # SplitMix64 with state 0 and increment GAMMA: its first output is a published constant.
    assert mix64(GAMMA) == 0xE220A8397B1DCDAF


def test_torch_and_numpy_bytes_equal_python_reference() -> None:
    seed, layer, b, features = 123456789, 2, 3, 13
    t_bytes = keep_bytes(seed, layer, b, 0, 12, features, CPU).numpy()
    n_bytes = keep_bytes_numpy(seed, layer, b, 0, 12, features)
    assert np.array_equal(t_bytes, n_bytes)
    key = layer_key(seed, layer)
    row = 7  # pass 2, input 1
    ctr = (2 << PASS_SHIFT) | (1 << ROW_SHIFT) | 1  # second word: bytes 8..15
    word = mix64((key + ctr * GAMMA) & MASK64)
    expected = [(word >> (8 * k)) & 0xFF for k in range(5)]  # features 8..12
    assert list(t_bytes[row, 8:13]) == expected


def test_bytes_do_not_depend_on_the_slice_asked_for() -> None:
    whole = keep_bytes(9, 0, 4, 0, 40, 20, CPU)
    part = keep_bytes(9, 0, 4, 13, 29, 20, CPU)
    assert torch.equal(whole[13:29], part)


def test_keep_rate_and_scale() -> None:
    for p in (0.1, 0.2, 0.3, 0.5):
        rule = KeepRule(p)
        assert abs(rule.keep_prob - (1 - p)) <= 2**-8
        assert rule.scale * rule.keep_prob == 1.0
        u = keep_bytes(42, 0, 100, 0, 2000, 64, CPU)
        rate = (u < rule.threshold).double().mean().item()
        n = u.numel()
        se = math.sqrt(rule.keep_prob * (1 - rule.keep_prob) / n)
        assert abs(rate - rule.keep_prob) < 5 * se, (p, rate)


def test_bytes_uniform_chi_square() -> None:
    u = keep_bytes(7, 1, 50, 0, 400, 256, CPU).flatten().numpy()
    counts = np.bincount(u, minlength=256)
    expected = u.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd sqrt(510) ~ 22.6; 6 sd is far in the tail.
    assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255)


def test_masks_independent_across_passes_rows_layers_and_seeds() -> None:
    """Correlation between keep indicators of different (pass, row, layer, seed) is ~0."""
    thr = KeepRule(0.5).threshold
    b, passes, f = 8, 500, 64
    base = (keep_bytes(1, 0, b, 0, passes * b, f, CPU) < thr).double()
    other_layer = (keep_bytes(1, 1, b, 0, passes * b, f, CPU) < thr).double()
    other_seed = (keep_bytes(2, 0, b, 0, passes * b, f, CPU) < thr).double()
    pairs = {
        "next pass": (base[:-b], base[b:]),
        "next row": (base[:-1], base[1:]),
        "next feature": (base[:, :-1], base[:, 1:]),
        "layer": (base, other_layer),
        "seed": (base, other_seed),
    }
    for name, (a, c) in pairs.items():
        a, c = a.flatten(), c.flatten()
        r = torch.corrcoef(torch.stack([a, c]))[0, 1].item()
        # Under independence r is ~N(0, 1/n).
        assert abs(r) < 5 / math.sqrt(a.numel()), (name, r)
