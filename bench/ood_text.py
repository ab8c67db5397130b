"""Out-of-distribution texts for `medical-abstracts` (issue 21, item 5), run by `bench.ood`.

In-distribution: the 575 test abstracts. Out of distribution, scored by the served model
(`models/medical-abstracts/<recipe.SERVED>`, through its calibration, T = 100, seed 0):

- the same test abstracts with their words shuffled (each text's whitespace-separated words
  permuted, seeded): every word is still medical, only the order is gone;
- non-medical English prose: the paragraphs of `bench/data/plain_prose.txt` (written for this
  benchmark: bakeries, railways, sailing, weather, ...) and paragraphs of the Python language
  reference that ships with CPython (`pydoc_data.topics`, technical prose), each as one text;
- scores: mutual information and predictive entropy (MC), and the share of each text's words
  that no two training texts hold (`unfamiliar`, service/engine/familiar.py: the served
  bundle's word list; for the held-out class, the list of the retrained network's rows);
- abstracts of a class never seen in training: the recipe's network retrained
  (`models.medical_abstracts.fit_recipe`, same seed and settings; uncalibrated) on the training
  rows without one class (`HELD_OUT`); the test rows of the four seen classes against those of the
  held-out one (a text that also carries the held-out label is left out of both).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import medical_abstracts as recipe
from service.bundle import load_bundle
from service.engine.familiar import Familiarity, familiar_words
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest, MCSampler
from service.engine.summaries import ClassificationSummary, summarize_classification
from service.engine.text import encode_texts
from service.packaging.writer import WORD_MIN_TEXTS
from service.training.text_data import encode

ROOT = Path(__file__).resolve().parents[1]
PROSE = Path(__file__).resolve().parent / "data" / "plain_prose.txt"
# One class (each retraining takes minutes on 2 shared cores): neoplasms, the largest specific
# class (128 test abstracts), so its interval is the narrowest. Add indices for more.
HELD_OUT = (0,)
PYDOC_PARAGRAPHS = 200  # the first this many paragraphs of 40+ words


def prose() -> list[str]:
    return [" ".join(p.split()) for p in PROSE.read_text().split("\n\n") if p.strip()]


def python_reference() -> list[str]:
    from pydoc_data.topics import topics  # CPython's own copy of its language reference

    paras = []
    for key in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[key]):
            words = p.split()
            if len(words) >= 40 and not p.startswith("   "):  # prose, not code listings
                paras.append(" ".join(words))
    return paras[:PYDOC_PARAGRAPHS]


def shuffled(texts: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.permutation(t.split())) for t in texts]


def scores(served: ServedModel, texts: list[str], passes: int, seed: int) -> dict[str, Any]:
    spec = served.manifest.inputs.text
    assert spec is not None
    batch = encode_texts(texts, served.bundle.tokenizer, spec, max_instances=len(texts))
    pred = served.predict(batch.ids, PredictParams(passes, (0.9,), seed))
    s = pred.summary
    assert isinstance(s, ClassificationSummary) and pred.referral is not None
    familiarity = served.calibrator.familiarity
    assert familiarity is not None, "the served bundle has no word list"
    return {
        "mi": s.mutual_information,
        "entropy": s.predictive_entropy,
        "unfamiliar": familiarity.share(batch.ids),
        "refer": pred.referral.refer.astype(np.float64),
    }


def shifts(auroc_row: Any, referred: Any, passes: int, seed: int, reps: int) -> list[dict]:
    served = ServedModel(load_bundle(ROOT / "models" / recipe.NAME / recipe.SERVED), device="cpu")
    test = recipe.load_data()
    texts = [test.texts[i] for i in test.parts["test"]]
    base = scores(served, texts, passes, seed)
    cases = {
        "shuffled word order": shuffled(texts, seed),
        f"plain English prose ({len(prose())} paragraphs)": prose(),
        "Python language reference (CPython's pydoc_data)": python_reference(),
    }
    rows = []
    for name, out_texts in cases.items():
        sc = scores(served, out_texts, passes, seed)
        for score in ("mi", "entropy", "unfamiliar"):
            r = auroc_row(f"medical-abstracts: {name}", base[score], sc[score], reps)
            rows.append(r | {"score": score} | referred(base, sc))
    return rows


def held_out_classes(auroc_row: Any, passes: int, seed: int, reps: int) -> list[dict]:
    data = recipe.load_data()
    tr, te = data.parts["train"], data.parts["test"]
    rows = []
    threads = torch.get_num_threads()
    for k in HELD_OUT:
        # A text carrying label k on another row is out of the training rows too.
        k_texts = {data.texts[i] for i in np.flatnonzero(data.y == k)}
        keep = [i for i in tr if data.texts[i] not in k_texts]
        y = data.y[keep]
        y = np.where(y > k, y - 1, y)  # labels 0..3
        torch.set_num_threads(1)
        fit = recipe.fit_recipe([data.texts[i] for i in keep], y, len(data.labels) - 1)
        torch.set_num_threads(threads)
        out = np.array([data.y[i] == k for i in te])
        ambiguous = np.array([data.y[i] != k and data.texts[i] in k_texts for i in te])
        ids = encode(fit.tokenizer, [data.texts[i] for i in te], recipe.MAX_TOKENS)
        sampler = MCSampler(fit.module, torch.as_tensor(ids[:2]), device="cpu")
        s = summarize_classification(sampler.run([MCRequest(ids, passes, seed)])[0], levels=())
        seen = ~out & ~ambiguous
        truth = data.y[te][seen]
        seen_acc = float((s.label[seen] == np.where(truth > k, truth - 1, truth)).mean())
        words = familiar_words(fit.tokenizer, [data.texts[i] for i in keep], WORD_MIN_TEXTS)
        unfamiliar = Familiarity(fit.tokenizer, frozenset(words), 0).share(ids)
        for score, v in (
            ("mi", s.mutual_information),
            ("entropy", s.predictive_entropy),
            ("unfamiliar", unfamiliar),
        ):
            r = auroc_row(f"medical-abstracts: held-out {data.labels[k]}", v[seen], v[out], reps)
            rows.append(r | {"score": score, "accuracy_on_seen": seen_acc})
    return rows
