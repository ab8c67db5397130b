"""The text architectures compared on the medical-abstracts test rows (issue 21, item 4).

    python -m bench.text_archs [--cache DIR] [--archs textcnn bilstm transformer fasttext]

Each architecture of `python -m service train --arch` is trained by `fit_text` on the data set's
training rows (the bundled recipe's seed, tokenizer and early stopping; settings in `SETTINGS`;
the TextCNN and the served average are the bundles `make models` built, `BUILT`), saved as a
bundle (uncalibrated: the comparison is of networks, not of temperatures) and scored on the 575
test rows with MC dropout at T = 20, mask seed 0: accuracy (strict and lenient), NLL, ECE, and
AUROC for detecting errors and AURC of each uncertainty score. Throughput: documents per second
through the engine (`ServedModel.predict`, one request of 64 documents at T = 20, the median of 5
after a warm-up), in this process, with torch's threads as the service would set them. Trained
bundles are kept in `--cache` (default /tmp/mcserve-text-archs), so a rerun only scores. Writes
<out>/architectures.md and .json."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bench.common import machine, write_report
from bench.medical_abstracts import ROOT, _detection, _scores
from models import common
from models import medical_abstracts as recipe
from service.bundle.load import load_bundle
from service.bundle.manifest import Defaults, Training
from service.calibration.data import read
from service.calibration.evaluation import uncertainty_scores
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest
from service.engine.summaries import summarize_classification
from service.packaging import save
from service.training.text import fit_text
from service.training.text_data import encode
from service.training.text_nets import Arch

T = 20
# The BiLSTM and transformer read 256 tokens (at 320 the transformer took about 33 s an epoch
# on the shared 2-core machine, docs/MODELS.md) and train to early stopping like the recipe.
SETTINGS: dict[str, dict[str, Any]] = {
    "bilstm": {"max_tokens": 256, "vocab_size": recipe.VOCAB},
    "transformer": {"max_tokens": 256, "vocab_size": recipe.VOCAB},
    "fasttext": {"max_tokens": recipe.MAX_TOKENS, "vocab_size": recipe.VOCAB, "lr": 5e-3},
}
# Changed with SETTINGS or the networks' code, so that a cached bundle of older ones is retrained
# (2: 256 tokens, early stopping, BiLSTM-max).
SETTINGS_TAG = 2
# Built by `make models` from the same code and rows, so not trained again: the TextCNN alone
# (versions 1-2 of the bundle, 320 tokens) and the TextCNN + fastText average (version 3,
# uncalibrated; the served version 7 adds a TF-IDF member, docs/MODELS.md).
BUILT = {"textcnn": "1", "average (version 3)": "3", "average (version 8, served)": "8"}


def train(arch: str, cache: Path) -> Path:
    if arch in BUILT:
        return ROOT / "models" / recipe.NAME / BUILT[arch]
    dest = cache / f"{recipe.NAME}-{arch}" / "1"
    if (dest / "manifest.json").is_file():
        cached = json.loads((dest / "manifest.json").read_text())["training"]["provenance"]
        if cached.get("settings") == SETTINGS_TAG:
            return dest
        shutil.rmtree(dest.parent)  # trained with other settings or code: train again
    cfg = dict(SETTINGS[arch])
    max_tokens, max_epochs = cfg.pop("max_tokens"), cfg.pop("max_epochs", recipe.MAX_EPOCHS)
    common.configure_determinism(recipe.SEED)
    data = recipe.load_data()
    tr = data.parts["train"]
    start = time.perf_counter()
    fit = fit_text(
        [data.texts[i] for i in tr], data.y[tr], len(data.labels), arch=cast(Arch, arch),
        max_tokens=max_tokens, seed=recipe.SEED, max_epochs=max_epochs, progress=True, **cfg,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    ids = encode(fit.tokenizer, [data.texts[i] for i in tr[:4]], max_tokens)
    prov = {
        "hyperparameters": fit.config.describe() | cfg,
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "best_validation_nll": fit.best_val_nll,
        "train_seconds": round(seconds, 1),
        "settings": SETTINGS_TAG,
    }
    save(
        fit.module, torch.as_tensor(ids), out_dir=cache, name=f"{recipe.NAME}-{arch}",
        version="1", task="classification",
        intended_use="Comparison of architectures only (bench/text_archs.py); not served.",
        labels=data.labels, target="condition", defaults=Defaults(samples=T),
        training=Training(provenance=prov), tokenizer=fit.tokenizer, truncation="truncate",
    )  # fmt: skip
    return dest


def score(bundle: Path, data_csv: Path) -> dict[str, Any]:
    s = ServedModel(load_bundle(bundle), device="cpu")
    rows = read(data_csv, s.manifest, tokenizer=s.bundle.tokenizer)
    assert rows.groups is not None
    summ = summarize_classification(s.sampler.run([MCRequest(rows.x, T, 0)])[0], levels=())
    p = summ.probabilities
    err = (p.argmax(1) != rows.y).astype(float)
    unc = uncertainty_scores(summ)
    batch, times = rows.x[:64], []
    s.predict(batch, PredictParams(T, (0.9,), 0))  # warm-up
    for _ in range(5):
        t0 = time.perf_counter()
        s.predict(batch, PredictParams(T, (0.9,), 0))
        times.append(time.perf_counter() - t0)
    prov = s.manifest.training.provenance
    if "members" in prov.get("hyperparameters", {}):  # the recipe's average: sum its members'
        members = prov["hyperparameters"]["members"]
        prov = {"epochs_run": "+".join(str(m["epochs_run"]) for m in members)}
    elif "train_seconds" not in prov:
        prov = {"epochs_run": prov.get("hyperparameters", {}).get("epochs_run")}
    return _scores(p, rows.y, rows.groups) | {
        "detection": _detection(unc, err),
        "documents_per_second": len(batch) / float(np.median(times)),
        "max_tokens": int(rows.x.shape[1]),
        "train_seconds": prov.get("train_seconds"),
        "epochs_run": prov.get("epochs_run"),
        "parameters": sum(int(v.numel()) for v in s.bundle.module.parameters()),
    }


def train_time(r: dict[str, Any]) -> str:
    if r["train_seconds"] is None:  # built by make models: docs/BENCHMARKS.md has its time
        return "built by `make models`"
    return f"{r['train_seconds']} s"


def markdown(res: dict[str, Any]) -> list[str]:
    lines = [
        f"## Architectures (MC dropout, T = {T}, uncalibrated)",
        "",
        f"`python -m bench.text_archs` ({res['machine']}, shared with other jobs). Each network "
        "trained by `fit_text` on the training rows (seed, tokenizer and early stopping of the "
        "bundled recipe), scored on the same 575 test rows. Documents/s: the engine in-process "
        f"(one request of 64 documents, T = {T}, median of 5), not over HTTP.",
        "",
        "| architecture | tokens | parameters | accuracy | lenient | NLL | ECE | best score: "
        "AUROC errors | AURC | MI: AUROC | documents/s | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, r in res["architectures"].items():
        det = r["detection"]
        best = max(det, key=lambda k: det[k]["auroc"])
        lines.append(
            f"| {arch} | {r['max_tokens']} | {r['parameters']:,} | {r['accuracy']:.3f} | "
            f"{r['accuracy_lenient']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} | {best}: "
            f"{det[best]['auroc']:.3f} | {det[best]['aurc']:.3f} | "
            f"{det['mutual_information']['auroc']:.3f} | {r['documents_per_second']:.0f} | "
            f"{r['epochs_run']} epochs, {train_time(r)} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mcserve-text-archs"))
    names = [*BUILT, *SETTINGS]
    ap.add_argument("--archs", nargs="+", default=names, choices=names)
    ap.add_argument(
        "--data", type=Path, default=ROOT / "models" / "data" / f"{recipe.NAME}-test.csv"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation" / recipe.NAME)
    args = ap.parse_args()
    torch.set_num_threads(1)  # training: one thread, as the bundled recipes (reproducible)
    bundles = {a: train(a, args.cache) for a in args.archs}
    torch.set_num_threads(2)  # scoring: as the service would on this 2-CPU machine
    res = {
        "machine": machine(),
        "architectures": {a: score(b, args.data) for a, b in bundles.items()},
    }
    text = "\n".join(["# medical-abstracts: architectures on the test rows", "", *markdown(res)])
    write_report(args.out, "architectures", res, text + "\n")


if __name__ == "__main__":
    main()
