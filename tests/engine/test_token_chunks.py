"""A text model's CPU forwards are sized in tokens (budgets.TOKEN_BUDGET): more, smaller chunks
than the row budget alone would give, and the same bits (bench/chunks.py measures the speed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from text_nets import LENGTH, TextCNN, token_batch
from torch import nn

from service.engine import MCRequest, MCSampler
from service.engine.budgets import TOKEN_BUDGET
from service.packaging.tracer import trace_with_shapes


def _pair(token_budget: int) -> tuple[MCSampler, MCSampler]:
    torch.manual_seed(0)
    x = token_batch()
    traced = trace_with_shapes(TextCNN().eval(), x)
    sized = MCSampler(traced, x, device="cpu", row_budget=16384, token_budget=token_budget)
    rows = MCSampler(traced, x, device="cpu", row_budget=16384, token_budget=None)
    return sized, rows


def test_text_forwards_hold_at_most_the_token_budget_with_the_same_bits() -> None:
    sized, rows = _pair(64 * LENGTH)
    assert sized.row_budget == 64 and rows.row_budget == 16384
    req = [MCRequest(token_batch(40, seed=3).numpy(), 30, 7)]  # 1,200 rows
    a, b = sized.run(req)[0], rows.run(req)[0]
    assert a.tobytes() == b.tobytes()
    assert sized.stats.forwards == -(-1200 // 64) and rows.stats.forwards == 1


def test_the_default_budget_and_tabular_inputs() -> None:
    sized, _ = _pair(TOKEN_BUDGET)
    assert sized.row_budget == TOKEN_BUDGET // LENGTH  # 512 rows of 16 tokens
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    tabular = MCSampler(trace_with_shapes(mlp.eval(), x), x, device="cpu", row_budget=16384)
    assert tabular.row_budget == 16384  # float rows are not tokens: the row budget alone


def test_integer_codes_that_are_not_text_keep_the_row_budget(tmp_path: Path) -> None:
    """A bundle of integer codes read by an embedding (categorical features, no tokenizer) is
    not a text: its forwards keep the row budget (budgets.TOKEN_BUDGET is for text inputs)."""
    from service.bundle.load import load_bundle
    from service.engine.model import ServedModel
    from service.packaging import save

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(12, 2)).eval()
    codes = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    path = save(
        net, codes, out_dir=tmp_path, name="codes", version="1", task="classification",
        intended_use="test", labels=["a", "b"],
    )  # fmt: skip
    served = ServedModel(load_bundle(path), device="cpu", row_budget=16384)
    # 16,384 rounded up to whole blocks of 21 rows (64 // 3 codes); as tokens it would be 2,730.
    assert served.manifest.inputs.text is None
    assert served.sampler.row_budget == -(-16384 // served.sampler.block) * served.sampler.block


def test_a_model_s_activations_size_its_forwards(monkeypatch: Any) -> None:
    """The load counts what one input makes; a forward holds at most ACTIVATION_BUDGET of it
    (a model making 40 M values per input got 128-row forwards, 20 GB, before). Same bits."""
    from service.bundle import load_bundle
    from service.bundle.activations import ACTIVATIONS_PER_INPUT
    from service.engine import budgets
    from service.engine.model import ServedModel

    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / "diabetes" / "2")
    per_input = bundle.module.meta[ACTIVATIONS_PER_INPUT]
    assert per_input > 0
    wide = ServedModel(bundle)
    monkeypatch.setattr(budgets, "ACTIVATION_BUDGET", per_input * 200)  # 200 inputs a forward
    narrow = ServedModel(bundle)
    assert wide.sampler.row_budget == 16384 and narrow.sampler.row_budget == 256  # 4 blocks
    x = torch.randn(30, 10).numpy() * 10 + 50
    req = [MCRequest(x, 40, 9)]  # 1,200 rows
    assert wide.sampler.run(req)[0].tobytes() == narrow.sampler.run(req)[0].tobytes()
    assert narrow.sampler.stats.forwards > wide.sampler.stats.forwards


@pytest.mark.parametrize("name", ["diabetes", "digits"])
def test_the_prefix_runs_within_its_budget_with_the_same_bits(monkeypatch: Any, name: str) -> None:
    """The prefix ran over every input of a batch at once: medical-abstracts' TF-IDF member
    makes 262,139 bigram counts per text, and 1,024 abstracts held 3.2 GB. It now runs at most
    PREFIX_BUDGET values at a time (digits: a convolution, whose algorithm follows the batch)."""
    from service.bundle import load_bundle
    from service.bundle.activations import ACTIVATIONS_PER_INPUT
    from service.engine import budgets, prefix
    from service.engine.model import ServedModel

    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / name / "2")
    wide = ServedModel(bundle)
    monkeypatch.setattr(budgets, "PREFIX_BUDGET", bundle.module.meta[ACTIVATIONS_PER_INPUT] * 70)
    narrow = ServedModel(bundle)
    assert wide.sampler.prefix_chunk > 1000 and narrow.sampler.prefix_chunk == 70
    seen: list[int] = []
    run = prefix._run
    monkeypatch.setattr(prefix, "_run", lambda m, x, **k: seen.append(x.shape[0]) or run(m, x, **k))
    spec = bundle.manifest.inputs
    u = np.random.default_rng(3).uniform(0, 1, (150, *spec.shape))
    if spec.valid_ranges:  # tabular: within each feature's range
        lo, hi = np.array(spec.valid_ranges).T
        u = lo + u * (hi - lo)
    x = (u if spec.valid_ranges else u * 16).astype(np.float32)
    req = [MCRequest(x, 5, 9)]
    alone = wide.sampler.run(req)[0]
    seen.clear()
    assert narrow.sampler.run(req)[0].tobytes() == alone.tobytes()
    pad = narrow.sampler.prefix_rows(narrow.sampler.plan(None))
    assert seen == [70, 70, max(10, pad)]  # the last chunk padded as a small batch is
    # The plain forward is chunked too (its matrix products round by batch size, as before).
    whole = wide.sampler.deterministic(x)
    seen.clear()
    narrow.sampler.module.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[0]))
    np.testing.assert_allclose(narrow.sampler.deterministic(x), whole, rtol=1e-5, atol=1e-6)
    assert seen == [70, 70, 64]  # the last chunk padded to min_rows, as a small batch is


def test_with_fixed_shapes_the_prefix_pad_is_within_the_budget_too(monkeypatch: Any) -> None:
    """On CUDA (and with a given min_rows) every prefix forward was padded to min_rows, the
    whole row budget there: 16,384 abstracts' prefix, 64 GB, for one text."""
    from service.bundle import load_bundle
    from service.bundle.activations import ACTIVATIONS_PER_INPUT
    from service.engine import budgets, prefix

    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / "diabetes" / "2")
    example = torch.as_tensor(np.array([[50.0, 1, 25, 90, 180, 100, 50, 4, 4.6, 90]] * 2))
    wide = MCSampler(bundle.module, example, device="cpu", min_rows=256)
    monkeypatch.setattr(budgets, "PREFIX_BUDGET", bundle.module.meta[ACTIVATIONS_PER_INPUT] * 70)
    narrow = MCSampler(bundle.module, example, device="cpu", min_rows=256)
    assert wide.prefix_chunk == 256 and narrow.prefix_chunk == 70
    seen: list[int] = []
    run = prefix._run
    monkeypatch.setattr(prefix, "_run", lambda m, x, **k: seen.append(x.shape[0]) or run(m, x, **k))
    x = np.random.default_rng(5).uniform(40, 60, (100, 10)).astype(np.float32)
    req = [MCRequest(x, 3, 4)]
    alone = wide.run(req)[0]
    seen.clear()
    assert narrow.run(req)[0].tobytes() == alone.tobytes()
    assert seen == [70, 70]  # one shape: the last chunk padded to it
    assert narrow.deterministic(x[:0]).shape == (0, 1)  # no inputs: an empty answer
