"""docs/BUNDLES.md's "The bundle vocabulary" lists exactly what the grammar takes: a refusal
points users there (service/bundle/architecture.py), so a stale list would mislead them."""

from __future__ import annotations

import re
from pathlib import Path

from service.bundle import unsupported
from service.bundle.architecture import ATTRIBUTES, FUNCTIONS, METHODS, MODULES

DOC = Path(__file__).resolve().parents[2] / "docs" / "BUNDLES.md"


def _section() -> str:
    text = DOC.read_text()
    start = text.index("### The bundle vocabulary")
    return text[start : text.index("\n## ", start)]


def _listed(section: str, heading: str) -> set[str]:
    """The comma-separated words of a bullet, from its bold heading to the next bullet."""
    bullet = section[section.index(f"- **{heading}**") :]
    end = bullet.find("\n- ", 1)
    words = re.findall(r"[A-Za-z_]\w*(?:\.\w+)*", bullet if end < 0 else bullet[:end])
    return set(words)


def test_the_documented_vocabulary_is_the_grammars() -> None:
    section = _section()
    # "- **Layers** (`nn.`): A, B, ...; and `service.nn`'s C and D." then prose and "Not in it"
    bullet = section[section.index("- **Layers** (`nn.`):") :]
    torch_part, rest = bullet.split("; and `service.nn`'s", 1)
    ours, rest = rest.split(".", 1)
    layers = set(re.findall(r"\w+", torch_part.split(":", 1)[1])) | set(ours.split(" and "))
    assert {n.strip() for n in layers} == set(MODULES), sorted(
        {n.strip() for n in layers} ^ set(MODULES)
    )
    # What a refusal suggests instead is named there, and is not in the vocabulary itself.
    not_in = rest[rest.index("Not in it") : rest.index("\n- ")]
    for name in unsupported._LAYER_HINTS:
        assert name not in MODULES and name.removesuffix("1d").removesuffix("2d") in not_in
    functions = _listed(section, "Functions")
    named = {k for k in FUNCTIONS if k != "builtins.getattr"}
    assert named <= functions, sorted(named - functions)
    assert set(ATTRIBUTES) <= functions  # read through getattr
    methods = _listed(section, "Tensor methods")
    assert methods - {"Tensor", "methods"} == METHODS, sorted(methods ^ METHODS)
    # Nothing listed as a function or layer that the grammar does not take:
    grammar_like = {w for w in functions if re.match(r"(torch|F|operator)\.", w)}
    assert grammar_like <= set(FUNCTIONS), sorted(grammar_like - set(FUNCTIONS))


def test_a_common_layer_outside_it_is_refused_with_what_to_write_instead(tmp_path: Path) -> None:
    import pytest
    import torch
    from torch import nn

    from service.errors import ModelError
    from service.packaging import save

    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.InstanceNorm1d(8), nn.Dropout(0.2), nn.Flatten())
    with pytest.raises(ModelError) as e:
        save(model.eval(), torch.randn(4, 4, 10), out_dir=tmp_path, name="s", version="1",
             task="regression", intended_use="t", target="y", noise_var=1.0)  # fmt: skip
    assert "of type InstanceNorm1d is not supported in a bundle: use nn.GroupNorm(C, C)" in (
        e.value.message
    )
    assert "docs/BUNDLES.md, 'The bundle vocabulary'" in e.value.message
    # The stand-in computes the same function (InstanceNorm with affine=True).
    x = torch.randn(3, 8, 10)
    inorm, gnorm = nn.InstanceNorm1d(8, affine=True), nn.GroupNorm(8, 8)
    torch.testing.assert_close(inorm(x), gnorm(x))
