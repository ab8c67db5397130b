"""`medical-abstracts`: medical paper abstracts into 5 patient-condition classes, by the average
of a TextCNN (first 320 tokens), a fastText-style bag of embeddings and a TF-IDF logistic
regression trained with n-gram dropout (both up to 900 tokens).

Data: `../shared/datasets/medical-abstracts/` (2,888 abstracts, CC BY-SA 3.0, see its README)
with its fixed train / calibration / test splits, grouped by text so that an abstract that
carries two labels never sits in two splits. The tokenizer and the network see the training rows
only (`service.training.text.fit_text`, the code `python -m service train --text-column` runs).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import common
from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Defaults, Training
from service.engine.sampler import MCRequest, MCSampler
from service.packaging import save
from service.training.text import PATIENCE, TextFit, fit_text, write_text_csv
from service.training.text_data import encode, read_splits, read_text_table
from service.training.text_nets import Arch, Average

NAME = "medical-abstracts"
SEED = 20240621
# Versions 1-2: the TextCNN alone; 3-5: TextCNN + fastText; 6-7: the three members below
# without a word list (kept, immutable; docs/MODELS.md). 8: version 6's network (same weights)
# and the training texts' words (words.txt, the unfamiliar-text referral).
VERSION = "8"
# The version served (the newest): VERSION calibrated by `python -m service calibrate
# models/medical-abstracts/8 --data models/data/medical-abstracts-calibration.csv --out models
# --method auto` (vector scaling, docs/MODELS.md). The benches read this one.
SERVED = "9"
# The members, each trained by fit_text on the same rows with the same seed and tokenizer:
# (architecture, tokens it reads (None: all MAX_TOKENS), fit_text's other arguments).
MEMBERS: list[tuple[Arch, int | None, dict[str, Any]]] = [
    ("textcnn", 320, {}),
    ("fasttext", None, {"lr": 5e-3}),
    ("tfidf", None, {"lr": 1e-2}),
]
MAX_TOKENS = 900  # WordPiece tokens: the longest training abstract has 879 (median 337)
MAX_EPOCHS = 60  # early stopping ends sooner
VOCAB = 4000  # chosen on held-out NLL of the training rows' 1/8 (docs/MODELS.md), not on test
DATA = Path(
    os.environ.get(
        "MCSERVE_MEDICAL_ABSTRACTS",
        str(common.MODELS_DIR.parent.parent / "shared" / "datasets" / "medical-abstracts"),
    )
)
LICENSE = "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/)"
CITATION = (
    "Tim Schopf, Daniel Braun, Florian Matthes. Evaluating Unsupervised Text Classification: "
    "Zero-Shot and Similarity-Based Approaches. NLPIR 2022. doi:10.1145/3582768.3582795"
)
SOURCE = (
    "Medical Abstracts Text Classification corpus (github.com/sebischair/"
    "Medical-Abstracts-TC-Corpus, medical_tc_test.csv: 2,888 abstracts, 5 classes)"
)
INTENDED_USE = (
    "Classification of English medical paper abstracts into 5 patient-condition classes "
    "(neoplasms, digestive system diseases, nervous system diseases, cardiovascular diseases, "
    "general pathological conditions), trained on 1,741 abstracts of the Medical Abstracts "
    f"corpus ({LICENSE}; cite {CITATION}). Demonstration, not for clinical use: it classifies "
    "paper abstracts, not patient notes. " + common.INTENDED_USE_SUFFIX
)


def _labels(data: Path) -> list[str]:
    with (data / "medical_tc_labels.csv").open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    by_id = {int(r[0]): r[1].strip() for r in rows}
    return [by_id[k] for k in sorted(by_id)]


@dataclass(frozen=True)
class Data:
    texts: list[str]
    y: np.ndarray  # class indices 0..4
    labels: list[str]
    parts: dict[str, np.ndarray]  # train / calibration / test row indices


def load_data(limit: int | None = None) -> Data:
    """The data set with its fixed splits (`limit`: the first rows of each split only)."""
    if not (DATA / "medical_tc_test.csv").is_file():
        raise FileNotFoundError(
            f"{DATA}: the medical abstracts data set is missing; put it there or set "
            "MCSERVE_MEDICAL_ABSTRACTS to its directory"
        )
    table = read_text_table(DATA / "medical_tc_test.csv", "condition_label", "medical_abstract")
    parts = read_splits(DATA / "splits.csv", len(table.texts))
    if limit is not None:
        parts = {k: v[:limit] for k, v in parts.items()}
    y = np.array([int(v) - 1 for v in table.values], dtype=np.int64)
    return Data(table.texts, y, _labels(DATA), parts)


@dataclass(frozen=True)
class RecipeFit:
    module: nn.Module  # eval mode: Average of the members
    tokenizer: Any
    members: list[TextFit]


def fit_recipe(
    texts: list[str],
    y: np.ndarray,
    n_classes: int,
    max_epochs: int = MAX_EPOCHS,
    members: list[tuple[Arch, int | None, dict[str, Any]]] = MEMBERS,
) -> RecipeFit:
    """The recipe's network on these rows (also `bench/ood_text.py`'s held-out-class runs;
    `bench/text_pretrained.py` passes other `members`)."""
    fits = [
        fit_text(
            texts,
            y,
            n_classes,
            arch=arch,
            max_tokens=tokens or MAX_TOKENS,
            seed=SEED,
            max_epochs=max_epochs,
            vocab_size=VOCAB,
            **kw,
        )
        for arch, tokens, kw in members
    ]
    vocabs = {f.tokenizer.to_str() for f in fits}
    assert len(vocabs) == 1, "members were given different tokenizers"
    module = Average([f.module for f in fits], [t for _, t, _ in members]).eval()
    return RecipeFit(module, fits[0].tokenizer, fits)


def build(
    out_dir: Path, data_dir: Path, *, limit: int | None = None, max_epochs: int = MAX_EPOCHS
) -> Path:
    """Train on the fixed splits, write the calibration/test CSVs and save the bundle.

    `limit` keeps the first `limit` rows of each split, `max_epochs` caps training (both for
    reproducibility tests on a subset)."""
    common.configure_determinism(SEED)
    data = load_data(limit)
    table, parts, labels, y = data, data.parts, data.labels, data.y
    tr, cal, te = parts["train"], parts["calibration"], parts["test"]
    fit = fit_recipe([table.texts[i] for i in tr], y[tr], len(labels), max_epochs)
    ids = encode(fit.tokenizer, table.texts, MAX_TOKENS)
    sampler = MCSampler(fit.module, torch.as_tensor(ids[:2]), device="cpu")
    mc = sampler.run([MCRequest(ids[te], common.MC_SAMPLES, common.MC_SEED)])[0]
    metrics = common.classification_metrics(mc, y[te])
    with torch.inference_mode():  # dropout off (the module is in eval mode); ids stay int64
        det_logits = fit.module(torch.as_tensor(ids[te])).numpy()
    det = common.classification_metrics(det_logits[None], y[te])
    for part, rows in (("calibration", cal), ("test", te)):
        write_text_csv(
            data_dir / f"{NAME}-{part}.csv",
            [table.texts[i] for i in rows],
            [labels[int(y[i])] for i in rows],
        )
    split = common.Split(train=tr, calibration=cal, test=te)
    prov = common.provenance(
        dataset=SOURCE,
        seed=SEED,
        split=split,
        hyperparameters={
            "architecture": "average of the members' probabilities (log of the mean softmax): "
            "TextCNN (Kim 2014: embedding, dropout, Conv1d widths 3/4/5, max over time, "
            "dropout, linear) on the first 320 tokens, fastText-style (word dropout 0.3, "
            "mean of token embeddings, linear) on all tokens, and logistic regression on the "
            "TF-IDF vector of token unigrams and hashed bigrams (sublinear tf, idf of the "
            "training rows, min_df 2, L2-normalised) with n-gram dropout 0.5, on all tokens",
            "members": [
                f.config.describe()
                | {
                    "reads_tokens": tokens or MAX_TOKENS,
                    "optimizer": f"Adam, lr {kw.get('lr', 1e-3)}, batch 32",
                    "epochs_run": f.epochs_run,
                    "best_epoch": f.best_epoch,
                    "best_validation_nll": round(f.best_val_nll, 6),
                }
                for f, (_, tokens, kw) in zip(fit.members, MEMBERS, strict=True)
            ],
            "early_stopping": f"each member: lowest NLL on 1/8 of the training rows, "
            f"patience {PATIENCE}",
            "max_tokens": MAX_TOKENS,
            "tokenizer": f"WordPiece fitted on the training rows only, "
            f"{fit.tokenizer.get_vocab_size()} entries",
        },
    )
    prov["split"]["method"] = "the data set's fixed splits.csv (grouped by text; 60/20/20)"
    prov["license"] = LICENSE
    prov["citation"] = CITATION
    return save(
        fit.module,
        torch.as_tensor(ids[tr][:4]),
        out_dir=out_dir,
        name=NAME,
        version=VERSION,
        task="classification",
        intended_use=INTENDED_USE,
        labels=labels,
        target="condition",
        defaults=Defaults(samples=100, confidence=0.95, interval="gaussian"),
        training=Training(
            provenance=prov,
            metrics=common.rounded(metrics)
            | {f"deterministic_{k}": v for k, v in common.rounded(det).items()},
            row_fingerprints={
                "train": row_fingerprint(ids[tr]),
                "calibration": row_fingerprint(ids[cal]),
                "test": row_fingerprint(ids[te]),
            },
        ),
        tokenizer=fit.tokenizer,
        truncation="truncate",
        training_texts=[table.texts[i] for i in tr],
    )
