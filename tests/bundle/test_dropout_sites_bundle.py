"""The dropout-site setting in a bundle (issue 20, item 3): written by `save`, validated in the
manifest, served as the default, overridden per request within 1..sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from text_nets import TransformerClassifier, token_batch

from service.bundle import load_bundle
from service.bundle.manifest import MANIFEST_NAME, parse_manifest
from service.engine import MCRequest
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import BundleError, InvalidInputError, ModelError
from service.packaging import save

# The transformer's sites in graph order: per encoder layer the attention weights, the two
# residual branches and the feed-forward's inner dropout; then the head's.
SITES = [
    f"enc.layers.{i}.{s}"
    for i in range(2)
    for s in ("self_attn.dropout", "dropout1", "dropout", "dropout2")
] + ["drop"]


@pytest.fixture(scope="module")
def head_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save(
        TransformerClassifier().eval(), token_batch(), out_dir=tmp_path_factory.mktemp("sites"),
        name="tr", version="1", task="classification", intended_use="tests",
        labels=["a", "b", "c"], dropout_sites=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(head_only: Path) -> ServedModel:
    return ServedModel(load_bundle(head_only), fused_masks=False)


def test_the_setting_is_written_and_served_as_the_default(
    head_only: Path, served: ServedModel
) -> None:
    m = served.manifest
    assert json.loads((head_only / MANIFEST_NAME).read_text())["mc"] == {
        "dropout_sites": {"last": 1}
    }
    assert m.sampled_sites == 1 and served.sampler.sites == len(SITES)
    x = token_batch(3, seed=4).numpy()
    pred = served.predict(x, PredictParams(samples=20, confidence=(0.9,), seed=5))
    assert pred.dropout_sites == 1
    assert (
        served.predict(x, PredictParams(20, (0.9,), 5, dropout_sites="all")).dropout_sites is None
    )
    head = served.sampler.plan(1)
    assert [s.name for s in head.graph.sites] == ["drop"]
    # Head-only: the whole encoder is the prefix, run once per input; the passes run the head.
    read = {n.target for n in head.graph.suffix.graph.nodes if n.op == "get_attr"}
    assert read == {"fc.weight", "fc.bias"}
    assert any("enc.layers.1" in str(n.target) for n in head.graph.prefix.graph.nodes)


@pytest.mark.parametrize("k", [3, len(SITES)])
def test_every_chosen_site_is_sampled(served: ServedModel, k: int) -> None:
    """With the last k, exactly those sites are sampled and each one's mask changes the output
    (with k = all of them: no site left deterministic)."""
    plan = served.sampler.plan(k)
    g = plan.graph
    assert [s.name for s in g.sites] == SITES[-k:]
    assert g.first_site == len(SITES) - k
    x = torch.as_tensor(token_batch(3, seed=2))
    with torch.inference_mode():
        frontier = plan.prefix(x)
        ones = [torch.ones((3, *s.mask_shape)) for s in g.sites]
        base = g.suffix(*frontier, *ones)
        gen = torch.Generator().manual_seed(1)
        for i, site in enumerate(g.sites):
            keeps = list(ones)
            keeps[i] = (torch.rand((3, *site.mask_shape), generator=gen) > 0.5).float()
            assert not torch.equal(g.suffix(*frontier, *keeps), base), site.name


def test_settings_cost_and_bits(served: ServedModel) -> None:
    """The same seed and setting replay the same bytes; the settings give other answers."""
    x = token_batch(2, seed=7).numpy()
    runs = {k: served.sampler.run([MCRequest(x, 10, 3, sites=k)])[0] for k in (1, 3, None)}
    for k, out in runs.items():
        assert served.sampler.run([MCRequest(x, 10, 3, sites=k)])[0].tobytes() == out.tobytes()
        assert out.std(0).min() > 0
    assert not np.array_equal(runs[1], runs[3]) and not np.array_equal(runs[3], runs[None])


@pytest.mark.parametrize("bad", [0, len(SITES) + 1, True, -1])
def test_a_request_outside_the_range_is_refused(served: ServedModel, bad: int) -> None:
    with pytest.raises(InvalidInputError, match=rf"1 <= k <= {len(SITES)}.*got {bad!r}"):
        served.check_params(PredictParams(20, (0.9,), dropout_sites=bad))
    # Deterministic mode runs no dropout: nothing to refuse.
    served.check_params(PredictParams(20, (0.9,), mode="deterministic", dropout_sites=bad))


@pytest.mark.parametrize(
    "value, message",
    [
        ({"last": 0}, "use 'all' or {'last': k} with an integer k >= 1, got {'last': 0}"),
        ({"last": len(SITES) + 1}, f"the last {len(SITES) + 1} dropout sites but the model has 9"),
        ("some", "at 'mc.dropout_sites': Value error, use 'all' or {'last': k}"),
        ({"last": 2, "first": 1}, "got {'last': 2, 'first': 1}"),
        ({"last": "2"}, "got {'last': '2'}"),
    ],
)
def test_the_manifest_refuses_a_bad_setting(head_only: Path, value: object, message: str) -> None:
    doc = json.loads((head_only / MANIFEST_NAME).read_text())
    doc["mc"] = {"dropout_sites": value}
    with pytest.raises(BundleError, match="invalid manifest") as err:
        parse_manifest(json.dumps(doc).encode(), "m.json")
    assert message in str(err.value)


def test_the_manifest_reads_the_full_count_and_absence_as_all(head_only: Path) -> None:
    doc = json.loads((head_only / MANIFEST_NAME).read_text())
    doc["mc"] = {"dropout_sites": {"last": len(SITES)}}
    assert parse_manifest(json.dumps(doc).encode(), "m.json").sampled_sites is None
    del doc["mc"]
    assert parse_manifest(json.dumps(doc).encode(), "m.json").sampled_sites is None


def test_save_refuses_a_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=r"dropout_sites=10: use 'all' or an integer k with 1 <= k <= 9"
    ):
        save(
            TransformerClassifier().eval(), token_batch(), out_dir=tmp_path, name="tr",
            version="1", task="classification", intended_use="tests", labels=["a", "b", "c"],
            dropout_sites=10,
        )  # fmt: skip
    assert not (tmp_path / "tr").exists()  # refused before anything was written
