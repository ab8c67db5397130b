"""Token ids past the embedding that reads them: a tokenizer whose ids (or a value_range, or a
pad id) reach rows the embedding lacks loaded, and every text holding such an id was a 500 (MC)
or an ONNX Runtime error (deterministic). Refused at load, naming the file and the layer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hostile import edit_json, repin

from service.bundle import load_bundle
from service.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    dest = tmp_path / "medical-abstracts" / "1"
    shutil.copytree(ROOT / "models" / "medical-abstracts" / "1", dest)
    return dest


def test_the_bundled_text_model_fits_its_embedding(bundle: Path) -> None:
    assert load_bundle(bundle).tokenizer is not None


def test_a_tokenizer_id_past_the_embedding_is_refused(bundle: Path) -> None:
    """The reviewer's: a common word mapped to 4500 in a 4,000-row embedding. The vocabulary
    still has 4,000 entries (ids need not be dense): its largest id is what counts."""

    def change(d: dict[str, Any]) -> None:
        d["model"]["vocab"]["patients"] = 4500

    edit_json(bundle / "tokenizer.json", change)
    repin(bundle, "tokenizer.json")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/tokenizer.json: makes ids up to 4500 but the embedding 'emb' has 4000 rows "
        "(ids 0..3999); package the model with the tokenizer it was trained with (or an "
        "embedding as large as its vocabulary)"
    )


def test_an_added_token_past_the_embedding_is_refused(bundle: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["added_tokens"].append(
            {"id": 4000, "content": "[NEW]", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip

    edit_json(bundle / "tokenizer.json", change)
    repin(bundle, "tokenizer.json")
    with pytest.raises(BundleError, match=r"/tokenizer.json: makes ids up to 4000 but the emb"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "value_range",
            [0, 4000],
            "inputs.value_range [0, 4000] holds ids the model has no row for; the embedding "
            "'emb' has 4000 rows (ids 0..3999): give a range within it",
        ),
        (
            "value_range",
            [-1, 10],
            "inputs.value_range [-1, 10] holds ids the model has no row for; the embedding "
            "'emb' has 4000 rows (ids 0..3999): give a range within it",
        ),
        (
            "text.pad_id",
            4000,
            "inputs.text.pad_id 4000 has no row; the embedding 'emb' has 4000 rows (ids 0..3999)",
        ),
    ],
    ids=["value-range-high", "value-range-negative", "pad-id"],
)
def test_manifest_ids_past_the_embedding_are_refused(
    bundle: Path, field: str, value: Any, expected: str
) -> None:
    def change(d: dict[str, Any]) -> None:
        node = d["inputs"]
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value

    edit_json(bundle / "manifest.json", change)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == f"{bundle}/manifest.json: {expected}"
