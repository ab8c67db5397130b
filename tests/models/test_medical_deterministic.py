"""A text's deterministic answer does not depend on what shares its request (served model)."""

from __future__ import annotations

import csv
from pathlib import Path

from models import medical_abstracts as recipe
from service.bundle import load_bundle
from service.engine.model import ServedModel
from service.engine.text import encode_texts

ROOT = Path(__file__).resolve().parents[2]


def test_a_texts_deterministic_answer_is_the_same_bits_alone_and_in_company() -> None:
    """Batched, ONNX Runtime's convolutions rounded each text by the request's size (up to 5e-8
    on these abstracts, every row differing): each text now runs alone. (The torch fallback,
    for bundles without a usable ONNX graph, stays batched: one text a call cost 100x.)"""
    backend = "onnxruntime"
    bundle = load_bundle(ROOT / "models" / recipe.NAME / recipe.SERVED)
    model = ServedModel(bundle)
    spec = bundle.manifest.inputs.text
    assert spec is not None
    with (ROOT / "models" / "data" / f"{recipe.NAME}-test.csv").open(newline="") as fh:
        texts = [row["text"] for _, row in zip(range(12), csv.DictReader(fh), strict=False)]
    x = encode_texts(texts, bundle.tokenizer, spec, len(texts)).ids
    together = model.deterministic(x)
    assert together.backend == backend
    assert together.point is not None
    for i in (0, 5, 11):
        alone = model.deterministic(x[i : i + 1]).point
        assert alone is not None
        assert alone[0].tobytes() == together.point[i].tobytes()
    pair = model.deterministic(x[[3, 0]]).point  # another companion, another place
    assert pair is not None and pair[1].tobytes() == together.point[0].tobytes()
