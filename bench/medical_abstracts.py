"""Comparisons for the `medical-abstracts` report (issue 21, item 4), on the fixed test rows.

    python -m bench.medical_abstracts [--model models/medical-abstracts/<recipe.SERVED>] [--out DIR]
    python -m bench.medical_abstracts --sites-only   # only the dropout-sites part, merged

- The floor: TF-IDF (word 1-2-grams, sublinear tf, min_df 2) + logistic regression
  (scikit-learn, lbfgs), fitted on the training rows; C chosen by accuracy on the calibration
  rows; its probabilities then calibrated on the calibration rows by a temperature on the log
  probabilities (`service.calibration.temperature.fit`, minimum NLL), and also by vector scaling
  (`service.calibration.vector.fit`, the served model's method) for a like-for-like reading.
- The served model with MC dropout at T = 20, 50, 100 passes (mask seed 0, through the bundle's
  calibration), against the same network's single deterministic softmax (dropout off), read
  raw and through the bundle's calibration.
- All dropout sites against head-only sampling (`dropout_sites()`) for the transformer of
  bench/text_archs.py (its cached bundle, trained there with its settings if absent), at
  T = 20, 50, 100, with documents/s and paired bootstrap differences. `--sites-only` measures
  only this part (about 10 minutes here) and merges it into an existing comparisons.json.

For each: accuracy and macro-F1 (strict, and lenient: right when the prediction is any label of
the text), NLL, ECE (15 bins), AUROC for detecting errors and AURC of each uncertainty score.
Writes <out>/comparisons.md and <out>/comparisons.json. Seeded; about 9 minutes on the shared
two cores, plus the sites part.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, now, write_report
from models import medical_abstracts as recipe
from service.bundle.load import load_bundle
from service.calibration import metrics, temperature, vector
from service.calibration.data import read
from service.calibration.evaluation import uncertainty_scores
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest
from service.engine.summaries import summarize_classification
from service.training.text_data import read_splits, read_text_table

ROOT = Path(__file__).resolve().parents[1]


def _scores(probs: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    k = probs.shape[1]
    pred = probs.argmax(1)
    lenient = metrics.lenient_targets(pred, y, groups)
    return {
        "accuracy": metrics.accuracy(probs, y),
        "accuracy_lenient": float(np.mean(pred == lenient)),
        "macro_f1": metrics.macro_f1(pred, y, k),
        "macro_f1_lenient": metrics.macro_f1(pred, lenient, k),
        "nll": metrics.nll(probs, y),
        "brier": metrics.brier(probs, y),
        "ece": metrics.ece(probs, y),
    }


def _detection(uncertainty: dict[str, np.ndarray], error: np.ndarray) -> dict[str, Any]:
    return {
        name: {"auroc": metrics.auroc(u, error > 0), "aurc": metrics.aurc(u, error)}
        for name, u in uncertainty.items()
    }


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def floor(y: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    table = read_text_table(
        recipe.DATA / "medical_tc_test.csv", "condition_label", "medical_abstract"
    )
    parts = read_splits(recipe.DATA / "splits.csv", len(table.texts))
    labels = np.array([int(v) - 1 for v in table.values])
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    xtr = vec.fit_transform([table.texts[i] for i in parts["train"]])
    xcal = vec.transform([table.texts[i] for i in parts["calibration"]])
    xte = vec.transform([table.texts[i] for i in parts["test"]])
    ytr, ycal = labels[parts["train"]], labels[parts["calibration"]]
    assert np.array_equal(labels[parts["test"]], y), "test rows differ from the bundle's CSV"
    grid = [0.5, 1, 2, 4, 8, 16, 32, 64]
    acc = {}
    for c in grid:
        m = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        acc[c] = float((m.predict(xcal) == ycal).mean())
    best = max(grid, key=lambda c: (acc[c], -c))  # ties: the stronger regularisation
    model = LogisticRegression(C=best, max_iter=2000).fit(xtr, ytr)
    log_cal = np.log(np.clip(model.predict_proba(xcal), 1e-12, 1))[None]
    t = temperature.fit(log_cal, ycal, one_se=False)
    vs = vector.fit(log_cal, ycal)
    p_raw = model.predict_proba(xte)
    log_te = np.log(np.clip(p_raw, 1e-12, 1))
    p_cal = _softmax(log_te / t)
    p_vec = _softmax(log_te * vs.scale + vs.bias)
    out: dict[str, Any] = {
        "C": best,
        "calibration_accuracy_by_C": acc,
        "temperature": t,
        "vector_scaling": {"scale": vs.scale.tolist(), "bias": vs.bias.tolist()},
    }
    for name, p in (("uncalibrated", p_raw), ("calibrated", p_cal), ("vector_scaled", p_vec)):
        err = (p.argmax(1) != y).astype(float)
        out[name] = _scores(p, y, groups) | {
            "detection": _detection({"one_minus_max_probability": 1 - p.max(1)}, err)
        }
    return out


def served(path: Path, passes: list[int], data: Path) -> tuple[dict[str, Any], Any]:
    s = ServedModel(load_bundle(path), device="cpu")
    rows = read(data, s.manifest, tokenizer=s.bundle.tokenizer)
    cal = s.calibrator
    out: dict[str, Any] = {
        "temperature": cal.temperature,
        "class_scale": None if cal.class_scale is None else cal.class_scale.tolist(),
        "class_bias": None if cal.class_bias is None else cal.class_bias.tolist(),
    }
    for n in passes:
        logits = s.sampler.run([MCRequest(rows.x, n, 0)])[0]
        summ = cal.classify(logits, levels=())
        p = summ.probabilities
        err = (p.argmax(1) != rows.y).astype(float)
        unc = uncertainty_scores(summ)
        out[f"mc_{n}"] = _scores(p, rows.y, rows.groups) | {"detection": _detection(unc, err)}
        out[f"mc_{n}"]["by_class"] = _errors_by_class(p.argmax(1), rows.y, unc)
    z = np.asarray(s.sampler.deterministic(rows.x), dtype=np.float64)
    for name, zz in (("deterministic_t1", z), ("deterministic_calibrated", cal.logits(z))):
        p = _softmax(zz)
        err = (p.argmax(1) != rows.y).astype(float)
        ent = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)
        unc = {"one_minus_max_probability": 1 - p.max(1), "predictive_entropy": ent}
        out[name] = _scores(p, rows.y, rows.groups) | {"detection": _detection(unc, err)}
    return out, rows


GENERAL = 4  # "general pathological conditions": overlaps the other four in meaning


def _errors_by_class(pred: np.ndarray, y: np.ndarray, unc: dict[str, np.ndarray]) -> dict:
    """Where the errors are: how many involve the general class (as truth or prediction), and
    how well each score detects the errors among the rows that do not involve it."""
    err = pred != y
    general = (pred == GENERAL) | (y == GENERAL)
    rest = ~general
    return {
        "errors": int(err.sum()),
        "errors_involving_general": int((err & general).sum()),
        "rows_not_involving_general": int(rest.sum()),
        "auroc_rows_not_involving_general": {
            k: metrics.auroc(v[rest], err[rest]) for k, v in unc.items()
        },
        "auroc_rows_involving_general": {
            k: metrics.auroc(v[general], err[general]) for k, v in unc.items()
        },
    }


# The transformer of bench/text_archs.py (trained there, cached; its bundle is uncalibrated).
TRANSFORMER = Path("/tmp/mcserve-text-archs") / f"{recipe.NAME}-transformer" / "1"
SITES_PASSES = (20, 50, 100)
SITES_SETTINGS: dict[str, int | None] = {"all_sites": None, "head_only": 1}  # None: every site
BOOTSTRAP_REPS = 1000
THROUGHPUT_REPEATS = 3


def _uncertainty(logits: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    summ = summarize_classification(logits, levels=())
    return summ.probabilities, uncertainty_scores(summ)


def _paired_bootstrap(
    a: tuple[np.ndarray, dict[str, np.ndarray]],
    b: tuple[np.ndarray, dict[str, np.ndarray]],
    reps: int,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC and AURC of a minus those of b, per score, with the standard deviation and the 2.5 /
    97.5 % percentiles over `reps` resamples of the test rows (the same rows for both)."""
    (err_a, unc_a), (err_b, unc_b) = a, b
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, err_a.size, err_a.size) for _ in range(reps)]

    def diff(metric: str, name: str, i: np.ndarray | slice) -> float:
        if metric == "auroc":
            return metrics.auroc(unc_a[name][i], err_a[i] > 0) - metrics.auroc(
                unc_b[name][i], err_b[i] > 0
            )
        return metrics.aurc(unc_a[name][i], err_a[i]) - metrics.aurc(unc_b[name][i], err_b[i])

    out: dict[str, Any] = {}
    for name in unc_a:
        out[name] = {}
        for metric in ("auroc", "aurc"):
            draws = np.array([diff(metric, name, i) for i in idx])
            lo, hi = np.nanpercentile(draws, [2.5, 97.5])
            out[name][metric] = {
                "difference": diff(metric, name, slice(None)),
                "bootstrap_se": float(np.nanstd(draws, ddof=1)),
                "ci95": [float(lo), float(hi)],
            }
    return out


def _throughput(s: ServedModel, batch: np.ndarray, params: PredictParams) -> float:
    """Documents/s through the engine in-process: one request, the median of THROUGHPUT_REPEATS
    after a warm-up (which also builds the split for the setting)."""
    s.predict(batch, params)
    times = []
    for _ in range(THROUGHPUT_REPEATS):
        t0 = time.perf_counter()
        s.predict(batch, params)
        times.append(time.perf_counter() - t0)
    return len(batch) / float(np.median(times))


def dropout_sites(
    bundle: Path, data: Path, passes: tuple[int, ...] = SITES_PASSES, reps: int = BOOTSTRAP_REPS
) -> dict[str, Any]:
    """All dropout sites against head-only sampling for the transformer (issue 21, item 4).

    The transformer of `bench.text_archs` (its cached bundle, uncalibrated: temperature 1) on the
    test rows at T = 20, 50, 100, mask seed 0, with every site sampled ("all_sites") and with only
    the last one, the dropout before the final linear layer ("head_only", `MCRequest(sites=1)`:
    the encoder then runs once per document in eval mode). Per setting and T: the metrics of
    `served` (accuracy, NLL, ECE, detection per score) and documents/s (`ServedModel.predict`,
    one request of 64 documents, the median of 3 after a warm-up, as bench.text_archs but 3 for
    5: at T = 100 every site costs about 20 s a request here); per T: all sites minus head
    only in AUROC and AURC per score, with a paired bootstrap over the test rows (the same
    resampled rows for both settings). Also the same network's deterministic softmax."""
    s = ServedModel(load_bundle(bundle), device="cpu")
    rows = read(data, s.manifest, tokenizer=s.bundle.tokenizer)
    assert rows.groups is not None
    prov = s.manifest.training.provenance
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "rows": rows.n,
        "sites": s.sampler.sites,
        "head_site": s.manifest.dropout[-1].name,
        "head_p": s.manifest.dropout[-1].p,
        "max_tokens": int(rows.x.shape[1]),
        "epochs_run": prov.get("epochs_run"),
        "best_epoch": prov.get("best_epoch"),
        "train_seconds": prov.get("train_seconds"),
        "torch_threads": torch.get_num_threads(),
        "bootstrap_reps": reps,
        "settings": {name: {} for name in SITES_SETTINGS},
        "difference_all_minus_head": {},
    }
    for n in passes:
        kept = {}
        for name, k in SITES_SETTINGS.items():
            p, unc = _uncertainty(s.sampler.run([MCRequest(rows.x, n, 0, sites=k)])[0])
            err = (p.argmax(1) != rows.y).astype(float)
            kept[name] = (err, unc)
            speed = _throughput(
                s, rows.x[:64], PredictParams(n, (0.9,), 0, dropout_sites=k or "all")
            )
            out["settings"][name][f"mc_{n}"] = _scores(p, rows.y, rows.groups) | {
                "detection": _detection(unc, err),
                "documents_per_second": speed,
            }
            print(f"dropout sites: {name} T = {n}: {speed:.1f} documents/s", flush=True)
        out["difference_all_minus_head"][f"mc_{n}"] = _paired_bootstrap(
            kept["all_sites"], kept["head_only"], reps
        )
    z = np.asarray(s.sampler.deterministic(rows.x), dtype=np.float64)
    p = _softmax(z)
    err = (p.argmax(1) != rows.y).astype(float)
    ent = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)
    unc = {"one_minus_max_probability": 1 - p.max(1), "predictive_entropy": ent}
    out["deterministic_t1"] = _scores(p, rows.y, rows.groups) | {"detection": _detection(unc, err)}
    return out


def _md(res: dict[str, Any]) -> str:
    def f(v: float) -> str:
        return f"{v:.3f}"

    lines = [
        "# medical-abstracts: comparisons on the test rows",
        "",
        f"Command: `python -m bench.medical_abstracts` ({res['rows']} test rows). Lenient: a "
        "prediction counts as right when it is any label of its text.",
        "",
        "| model | accuracy | lenient | macro-F1 | lenient | NLL | ECE | best score: AUROC "
        "errors | AURC | 1 - max p: AUROC | AURC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"TF-IDF + LR (C = {res['floor']['C']}), {k}", res["floor"][k]) for k in
            ("uncalibrated", "calibrated", "vector_scaled") if k in res["floor"]]  # fmt: skip
    rows += [(k.replace("_", " "), v) for k, v in _by_t(res["served"]) if isinstance(v, dict)]
    for name, r in rows:
        det = r["detection"]
        best = max(det, key=lambda k: det[k]["auroc"])
        mp = det["one_minus_max_probability"]
        lines.append(
            f"| {name} | {f(r['accuracy'])} | {f(r['accuracy_lenient'])} | {f(r['macro_f1'])} "
            f"| {f(r['macro_f1_lenient'])} | {f(r['nll'])} | {f(r['ece'])} "
            f"| {best}: {f(det[best]['auroc'])} | {f(det[best]['aurc'])} | {f(mp['auroc'])} "
            f"| {f(mp['aurc'])} |"
        )
    lines += ["", "AUROC / AURC of every score (MC rows):", ""]
    for k, v in _by_t(res["served"]):
        if isinstance(v, dict):
            cells = ", ".join(
                f"{s} {f(d['auroc'])} / {f(d['aurc'])}" for s, d in v["detection"].items()
            )
            lines.append(f"- {k}: {cells}")
    by = res["served"].get("mc_100", {}).get("by_class")
    if by:
        rest, inv = by["auroc_rows_not_involving_general"], by["auroc_rows_involving_general"]
        lines += [
            "",
            f"Where the errors are (MC T = 100): {by['errors_involving_general']} of "
            f'{by["errors"]} involve "general pathological conditions" as the true or the '
            f"predicted label. AUROC for errors on the {by['rows_not_involving_general']} rows "
            "that involve it in neither: "
            + ", ".join(f"{k} {f(v)}" for k, v in rest.items())
            + "; on the rows that do: "
            + ", ".join(f"{k} {f(v)}" for k, v in inv.items())
            + ".",
        ]
    lines += ["", "## All dropout sites against head-only sampling (transformer)", ""]
    if res.get("dropout_sites") is None:
        lines.append("Not measured: run `python -m bench.medical_abstracts --sites-only`.")
    else:
        lines += _sites_md(res["dropout_sites"], res)
    return "\n".join(lines) + "\n"


SCORES = {
    "mutual_information": "MI",
    "predictive_entropy": "entropy",
    "variation_ratio": "variation ratio",
    "one_minus_max_probability": "1 - max p",
}


def _by_t(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """Items keyed "mc_<T>" in increasing T, then the others by name (the JSON's keys are
    sorted as strings: mc_100 before mc_20)."""
    mc = sorted((kv for kv in d.items() if kv[0].startswith("mc_")), key=lambda kv: int(kv[0][3:]))
    return mc + sorted(kv for kv in d.items() if not kv[0].startswith("mc_"))


def _sites_md(r: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """The dropout-sites table, the paired differences and a reading of them from the numbers."""
    merged = r["command"].endswith("--sites-only")
    t0, first = next(iter(_by_t(r["settings"]["all_sites"])))
    t0 = t0.removeprefix("mc_")
    lines = [
        f"Command: `{r['command']}` ({r['machine']}, shared with other jobs; {r['date']})"
        + (
            ": measured alone and merged into comparisons.json, the sections above are from the "
            "last full run."
            if merged
            else "."
        ),
        "",
        f"The transformer of `bench.text_archs` (architectures.md): {r['max_tokens']} tokens, "
        f"{r['epochs_run']} epochs ({r['train_seconds']} s; early stopping kept epoch "
        f"{r.get('best_epoch', '?')}, after which held-out NLL rose: trained from scratch on "
        f"1,523 texts it overfits early; accuracy {first['accuracy']:.3f} at T = {t0} against "
        f"{res['served']['mc_20']['accuracy']:.3f} for the served model above at T = 20); "
        f"uncalibrated (temperature 1). Same {res['rows']} test rows, mask seed 0. All sites: "
        f"its {r['sites']} "
        f"dropout sites sampled; head only: the last, `{r['head_site']}` (p = {r['head_p']}, "
        "before the final linear layer), the encoder run once per document in eval mode "
        "(`dropout_sites` = 1). Detection: AUROC for errors / AURC per uncertainty score. "
        "Documents/s: `ServedModel.predict` in-process, one request of 64 documents, median of "
        f"3 after a warm-up, torch threads {r['torch_threads']}.",
        "",
        "| setting | T | accuracy | NLL | ECE | "
        + " | ".join(SCORES.values())
        + " | documents/s |",
        "|---|---|---|---|---|" + "---|" * len(SCORES) + "---|",
    ]
    for name, by_t in r["settings"].items():
        for key, m in _by_t(by_t):
            det = m["detection"]
            cells = " | ".join(f"{det[k]['auroc']:.3f} / {det[k]['aurc']:.3f}" for k in SCORES)
            lines.append(
                f"| {name.replace('_', ' ')} | {key.removeprefix('mc_')} | {m['accuracy']:.3f} | "
                f"{m['nll']:.3f} | {m['ece']:.3f} | {cells} | {m['documents_per_second']:.1f} |"
            )
    d = r["deterministic_t1"]
    det_cells = " | ".join(
        f"{d['detection'][k]['auroc']:.3f} / {d['detection'][k]['aurc']:.3f}"
        if k in d["detection"]
        else "-"
        for k in SCORES
    )
    lines += [
        f"| deterministic softmax | 1 | {d['accuracy']:.3f} | {d['nll']:.3f} | {d['ece']:.3f} "
        f"| {det_cells} | |",
        "",
        f"All sites minus head only, paired over the test rows: AUROC (positive: all sites "
        f"detects errors better) and AURC (negative: all sites better), each ± its bootstrap "
        f"standard error ({r['bootstrap_reps']} resamples of the rows, the same for both).",
        "",
        "| T | metric | " + " | ".join(SCORES.values()) + " |",
        "|---|---|" + "---|" * len(SCORES),
    ]
    for key, by_score in _by_t(r["difference_all_minus_head"]):
        for metric in ("auroc", "aurc"):
            diffs = [by_score[k][metric] for k in SCORES]
            cells = " | ".join(f"{v['difference']:+.3f} ± {v['bootstrap_se']:.3f}" for v in diffs)
            lines.append(f"| {key.removeprefix('mc_')} | {metric.upper()} | {cells} |")
    return [*lines, "", _sites_reading(r)]


def _sites_reading(r: dict[str, Any]) -> str:
    """One or two sentences from the numbers: is head-only worse at detecting errors?"""
    z = {
        (key, k): v[k]["auroc"]["difference"] / v[k]["auroc"]["bootstrap_se"]
        for key, v in r["difference_all_minus_head"].items()
        for k in SCORES
    }
    (tkey, score), zmax = max(z.items(), key=lambda kv: abs(kv[1]))
    diff = r["difference_all_minus_head"][tkey][score]["auroc"]
    worse = sum(1 for v in z.values() if v > 0)
    beyond = sum(1 for v in z.values() if abs(v) >= 2)
    best = {
        name: max((m["detection"][k]["auroc"], k, key) for key, m in by_t.items() for k in SCORES)
        for name, by_t in r["settings"].items()
    }
    det = r["deterministic_t1"]["detection"]
    best_det = max((v["auroc"], k) for k, v in det.items())
    se = [
        v[k]["auroc"]["bootstrap_se"]
        for v in r["difference_all_minus_head"].values()
        for k in SCORES
    ]
    speed = [
        r["settings"]["head_only"][key]["documents_per_second"] / m["documents_per_second"]
        for key, m in r["settings"]["all_sites"].items()
    ]
    text = (
        f"Reading: in {worse} of {len(z)} (T, score) pairs all sites detect errors better "
        f"than head only (AUROC), and {beyond} of the {len(z)} differences are two bootstrap "
        f"standard errors or more from zero; the largest, {SCORES[score]} at T = "
        f"{tkey.removeprefix('mc_')}, is {diff['difference']:+.3f} ± {diff['bootstrap_se']:.3f} "
        f"({zmax:+.1f} SE; 95 % interval {diff['ci95'][0]:+.3f} to {diff['ci95'][1]:+.3f}). "
        "The (T, score) pairs share the test rows, so they are not independent tests. Best "
        "AUROC for errors: "
        + ", ".join(
            f"{name.replace('_', ' ')} {b[0]:.3f} ({SCORES[b[1]]}, T = {b[2].removeprefix('mc_')})"
            for name, b in best.items()
        )
        + f", the deterministic softmax {best_det[0]:.3f} ({SCORES[best_det[1]]}). Head only "
        f"served {min(speed):.0f}-{max(speed):.0f}x the documents/s of all sites (one median "
        "of 3 each on the shared machine: noisy, read the order of magnitude)."
    )
    if beyond == 0:
        text += (
            " So on this network and these rows head-only sampling does not detect errors "
            "measurably worse than sampling every site (differences above about "
            f"{2 * max(se):.2f} AUROC would have shown): the literature's finding that head-only "
            "MC dropout is barely better than the plain softmax (docs/BUNDLES.md) holds here, "
            "but sampling every site is no better than the softmax either. The network is "
            "weak (trained from scratch on 1,523 texts) and its encoder dropout is p = 0.1, "
            "so its encoder adds little spread; a pretrained transformer may differ."
        )
    return text


def transformer_bundle(path: Path) -> Path:
    """The cached transformer of bench/text_archs.py, trained there (its settings) if absent."""
    if (path / "manifest.json").is_file():
        return path
    from bench import text_archs  # imports this module: here, not at the top

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # training: one thread, as bench.text_archs
    try:
        return text_archs.train("transformer", path.parents[1])
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / recipe.NAME / recipe.SERVED)
    ap.add_argument(
        "--data", type=Path, default=ROOT / "models" / "data" / f"{recipe.NAME}-test.csv"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation" / recipe.NAME)
    ap.add_argument(
        "--transformer", type=Path, default=TRANSFORMER,
        help="the transformer bundle of bench.text_archs (trained there if absent)",
    )  # fmt: skip
    ap.add_argument(
        "--sites-only", action="store_true",
        help="measure only the dropout-sites comparison and merge it into <out>/comparisons.json "
        "(the other results are kept from the run that wrote it)",
    )  # fmt: skip
    ap.add_argument("--reps", type=int, default=BOOTSTRAP_REPS, help="bootstrap resamples")
    args = ap.parse_args()
    torch.set_num_threads(2)  # scoring: as the service would on this 2-CPU machine
    sites = dropout_sites(transformer_bundle(args.transformer), args.data, reps=args.reps)
    sites["machine"], sites["date"] = machine(), now()
    if args.sites_only:
        res = json.loads((args.out / "comparisons.json").read_text())
        if sites["rows"] != res["rows"]:
            raise SystemExit(
                f"--sites-only: {args.data} has {sites['rows']} rows, the report's other "
                f"sections {res['rows']}: pass the same --data as the full run"
            )
        sites["command"] = "python -m bench.medical_abstracts --sites-only"
        res["dropout_sites"] = sites
    else:
        res_served, rows = served(args.model, [20, 50, 100], args.data)
        assert rows.groups is not None
        sites["command"] = "python -m bench.medical_abstracts"
        res = {
            "rows": rows.n,
            "floor": floor(rows.y, rows.groups),
            "served": res_served,
            "dropout_sites": sites,
        }
    write_report(args.out, "comparisons", res, _md(res))


if __name__ == "__main__":
    main()
