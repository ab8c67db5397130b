"""Reproduce the MC dropout UCI regression table (Gal & Ghahramani 2016) and check coverage.

    python -m bench.uci DATASET_DIR [DATASET_DIR ...] [--fast] [--splits K] [--T 10000]
        [--out DIR] [--epochs-mult 10] [--split-from A] [--summarise] [--noise learned]

DATASET_DIR has the layout of ../shared/datasets/uci/<name>/ (files under data/). Per split:
grid-select (dropout rate, tau) on the validation log-likelihood of the last 20 % of the training
rows, refit on all training rows, and score the test rows with T MC passes (RMSE of the MC mean
and the mixture log-likelihood, original units). The grid run's model of the chosen configuration
(trained on the first 80 % only) is calibrated on the last 20 %: split-conformal intervals with
the normalised score |y - mean| / std. Writes <out>/<dataset>/split_<i>.json,
<out>/<dataset>/summary.json and <out>/table.md (every data set summarised under <out>).

A data set's splits can run in several processes (`--split-from A --splits K` runs splits A to
A + K - 1 with the seeds the whole run would give them and writes only their split files);
`--summarise` then builds the summary from the split files under <out> without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.calibration import metrics
from service.training import FittedMLP, TrainResult, mixture_log_likelihood, train_mlps

# Published MC dropout numbers, 2016 paper: (RMSE mean, SE), (log-likelihood mean, SE).
PAPER_2016: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "concrete": ((5.23, 0.12), (-3.04, 0.02)),
    "energy": ((1.66, 0.04), (-1.99, 0.02)),
    "power-plant": ((4.02, 0.04), (-2.80, 0.01)),
    "protein-tertiary-structure": ((4.36, 0.01), (-2.89, 0.00)),
    "yacht": ((1.11, 0.09), (-1.55, 0.03)),
}
ROOT = Path(__file__).resolve().parents[1]
# Deep ensembles (Lakshminarayanan et al. 2017, 5 networks, same splits): test log-likelihood,
# the negated NLL quoted in the shared UCI README.
DEEP_ENSEMBLES_LL = {
    "concrete": -3.06,
    "energy": -1.38,
    "power-plant": -2.79,
    "protein-tertiary-structure": -2.83,
    "yacht": -1.18,
}
ALPHA = 0.05
Z = 1.959963984540054  # standard normal 0.975 quantile


def _read(path: Path) -> np.ndarray:
    """Whitespace-separated numbers; empty lines (some files end with one) are skipped."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64)


def load(root: Path) -> dict[str, Any]:
    d = root / "data"
    data = _read(d / "data.txt")
    feats = _read(d / "index_features.txt").astype(int).ravel()
    target = int(_read(d / "index_target.txt").ravel()[0])
    n_splits = int(_read(d / "n_splits.txt").ravel()[0])
    return {
        "name": root.name,
        "x": data[:, feats],
        "y": data[:, target],
        "n_splits": n_splits,
        "n_hidden": int(_read(d / "n_hidden.txt").ravel()[0]),
        "n_epochs": int(_read(d / "n_epochs.txt").ravel()[0]),
        "dropout_rates": [float(v) for v in _read(d / "dropout_rates.txt").ravel()],
        "taus": [float(v) for v in _read(d / "tau_values.txt").ravel()],
        "train": [_read(d / f"index_train_{i}.txt").astype(int).ravel() for i in range(n_splits)],
        "test": [_read(d / f"index_test_{i}.txt").astype(int).ravel() for i in range(n_splits)],
    }


@dataclass
class _MC:
    mean: np.ndarray  # MC mean, original units
    std: np.ndarray  # predictive std: sqrt(epistemic variance + 1 / tau)
    ll: float  # mean test log-likelihood per row
    tau: float  # original units


def _mc_stats(
    fitted: FittedMLP, x: np.ndarray, y: np.ndarray, passes: int, seed: int, batch_rows: int
) -> _MC:
    """MC mean, predictive std (epistemic + 1/tau) and mean log-likelihood on (x, y).

    A learned noise (`--noise learned`): std = sqrt(epistemic + mean of the passes' variances)
    and the log-likelihood is that of the mixture of the passes' Gaussians; `tau` is NaN."""
    if fitted.learned_noise:
        return _mc_learned(fitted, x, y, passes, seed, batch_rows)
    assert fitted.tau is not None
    tau = float(fitted.tau[0])
    samples = fitted.sample(x, passes, seed=seed, batch_rows=batch_rows)[..., 0]  # [T, B]
    mean = samples.mean(0, dtype=np.float64)
    var_e = np.maximum(samples.var(0, dtype=np.float64), 0.0)
    ll = np.empty(len(y))
    step = max(1, (1 << 22) // passes)
    for i in range(0, len(y), step):  # float64 logsumexp, chunked over rows
        s = torch.from_numpy(samples[:, i : i + step, None].astype(np.float64))
        yy = torch.from_numpy(y[i : i + step, None])
        ll[i : i + step] = mixture_log_likelihood(s, yy, torch.tensor([tau], dtype=torch.float64))
    return _MC(mean, np.sqrt(var_e + 1.0 / tau), float(ll.mean()), tau)


def _mc_learned(
    fitted: FittedMLP, x: np.ndarray, y: np.ndarray, passes: int, seed: int, batch_rows: int
) -> _MC:
    out = fitted.sample(x, passes, seed=seed, batch_rows=batch_rows)  # [T, B, 2]: mean, log var
    f, s2 = out[..., 0].astype(np.float64), np.exp(out[..., 1].astype(np.float64))
    mean, var_e = f.mean(0), np.maximum(f.var(0), 0.0)
    ll = np.empty(len(y))
    step = max(1, (1 << 22) // passes)
    for i in range(0, len(y), step):
        rows = slice(i, i + step)
        ll[rows] = metrics.mixture_log_likelihood(f[:, rows], y[rows], s2[:, rows])
    return _MC(mean, np.sqrt(var_e + s2.mean(0)), float(ll.mean()), math.nan)


def _interval(y: np.ndarray, mean: np.ndarray, half: np.ndarray) -> dict[str, float]:
    return {
        "coverage": float((np.abs(y - mean) <= half).mean()),
        "mean_width": float((2 * half).mean()),
    }


def run_split(
    ds: dict[str, Any], i: int, result: TrainResult, args: argparse.Namespace
) -> dict[str, Any]:
    x, y = ds["x"], ds["y"]
    tr, te = ds["train"][i], ds["test"][i]
    t0 = time.perf_counter()
    final = result.final
    test = _mc_stats(final, x[te], y[te], args.T, args.seed + 1000 + i, args.batch_rows)
    with torch.no_grad():  # weight-scaling (dropout off) prediction, for reference
        x_std = torch.from_numpy(((x[te] - final.x_mean) / final.x_std).astype(np.float32))
        det = final.model.eval()(x_std).numpy()[:, 0]
    assert final.y_std is not None and final.y_mean is not None
    det_pred = det * final.y_std[0] + final.y_mean[0]

    # Conformal: the chosen configuration's grid-run model never saw the last 20 % of the rows.
    cal_rows = tr[result.n_fit :]
    cal = _mc_stats(
        result.holdout, x[cal_rows], y[cal_rows], args.cal_T, args.seed + 2000 + i, args.batch_rows
    )
    hold = _mc_stats(
        result.holdout, x[te], y[te], args.cal_T, args.seed + 3000 + i, args.batch_rows
    )
    scores = np.sort(np.abs(y[cal_rows] - cal.mean) / cal.std)
    n = len(scores)
    k = math.ceil((n + 1) * (1 - ALPHA))
    q = float(scores[k - 1]) if k <= n else math.inf
    seconds = time.perf_counter() - t0
    return {
        "dataset": ds["name"],
        "split": i,
        "n_train": len(tr),
        "n_test": len(te),
        "epochs": result.epochs,
        "T": args.T,
        "cal_T": args.cal_T,
        "val_T": args.val_T,
        "noise": args.noise,
        "chosen": {"dropout_rate": result.dropout_rate, "tau": _num(test.tau)},
        "grid": [asdict(g) for g in result.grid],
        "rmse": float(np.sqrt(((test.mean - y[te]) ** 2).mean())),
        "rmse_weight_scaling": float(np.sqrt(((det_pred - y[te]) ** 2).mean())),
        "test_ll": test.ll,
        "gaussian_95": _interval(y[te], test.mean, Z * test.std),
        "holdout_model": {
            "n_fit": result.n_fit,
            "rmse": float(np.sqrt(((hold.mean - y[te]) ** 2).mean())),
            "test_ll": hold.ll,
            "cal_ll": cal.ll,  # vs the grid's val_ll of the chosen config: effect of val_T
            "gaussian_95": _interval(y[te], hold.mean, Z * hold.std),
        },
        "conformal_95": {
            "n_cal": n,
            "q": q,
            "expected_coverage": k / (n + 1),
            **_interval(y[te], hold.mean, q * hold.std),
        },
        "timings": {**result.timings, "predict_s": seconds},
    }


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN: a learned noise has no tau


def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return float(a.mean()), se


def summarise(splits: list[dict[str, Any]], wall_s: float, command: str) -> dict[str, Any]:
    name = splits[0]["dataset"]
    rmse, ll = _mean_se([s["rmse"] for s in splits]), _mean_se([s["test_ll"] for s in splits])
    conf = [s["conformal_95"] for s in splits]
    cov = _mean_se([c["coverage"] for c in conf])
    expected = float(np.mean([c["expected_coverage"] for c in conf]))
    # Standard error of the mean conformal coverage over S splits, from its exact sampling law on
    # exchangeable data: given the calibration set, coverage C ~ Beta(k, n + 1 - k); the n_test
    # test rows then add binomial noise. Var = Var C + (E(1 - E) - Var C) / n_test per split.
    var = []
    for s, c in zip(splits, conf, strict=True):
        n, e = c["n_cal"], c["expected_coverage"]
        k = math.ceil((n + 1) * (1 - ALPHA))
        var_beta = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
        var.append(var_beta + (e * (1 - e) - var_beta) / s["n_test"])
    se_theory = math.sqrt(float(np.mean(var)) / len(splits))
    out: dict[str, Any] = {
        "dataset": name,
        "splits": len(splits),
        "noise": splits[0].get("noise", "fixed"),
        "command": command,
        "wall_s": wall_s,
        "epochs": splits[0]["epochs"],
        "T": splits[0]["T"],
        "cal_T": splits[0]["cal_T"],
        "val_T": splits[0]["val_T"],
        "rmse": rmse,
        "test_ll": ll,
        "rmse_weight_scaling": _mean_se([s["rmse_weight_scaling"] for s in splits]),
        "chosen": [[s["chosen"]["dropout_rate"], s["chosen"]["tau"]] for s in splits],
        "gaussian_95": _mean_se([s["gaussian_95"]["coverage"] for s in splits]),
        "gaussian_95_width": float(np.mean([s["gaussian_95"]["mean_width"] for s in splits])),
        "holdout_gaussian_95": _mean_se(
            [s["holdout_model"]["gaussian_95"]["coverage"] for s in splits]
        ),
        "conformal_95": cov,
        "conformal_95_width": float(np.mean([c["mean_width"] for c in conf])),
        "conformal_expected": expected,
        "conformal_se_theory": se_theory,
        "n_cal": int(np.mean([c["n_cal"] for c in conf])),
        "n_test": int(np.mean([s["n_test"] for s in splits])),
        "checks": {"conformal_within_3se": abs(cov[0] - expected) <= 3 * se_theory},
    }
    if name in DEEP_ENSEMBLES_LL:
        out["deep_ensembles_ll"] = DEEP_ENSEMBLES_LL[name]
    if name in PAPER_2016:
        (pr, prse), (pl, plse) = PAPER_2016[name]
        out["paper_2016"] = {"rmse": [pr, prse], "test_ll": [pl, plse]}
        out["checks"]["rmse_within_2se"] = rmse[0] <= pr + 2 * math.hypot(rmse[1], prse)
        out["checks"]["ll_within_2se"] = ll[0] >= pl - 2 * math.hypot(ll[1], plse)
    return out


def _pm(v: tuple[float, float] | list[float], digits: int = 2) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _flag(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def table(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | splits | RMSE (ours) | RMSE 2016 | RMSE check | test LL (ours) | LL 2016 "
        "| LL check | gaussian 95 % cov. | conformal 95 % cov. | expected (n_cal) "
        "| conformal check | run time |\n" + "|---" * 13 + "|\n"
    )
    rows = []
    for s in summaries:
        paper = s.get("paper_2016")
        checks = s["checks"]
        rows.append(
            f"| {s['dataset']}{' (learned noise)' if s.get('noise') == 'learned' else ''} "
            f"| {s['splits']} | {_pm(s['rmse'])} "
            f"| {_pm(paper['rmse']) if paper else '-'} | {_flag(checks.get('rmse_within_2se'))} "
            f"| {_pm(s['test_ll'])} | {_pm(paper['test_ll']) if paper else '-'} "
            f"| {_flag(checks.get('ll_within_2se'))} | {_pm(s['gaussian_95'], 3)} "
            f"| {s['conformal_95'][0]:.3f} ± {s['conformal_se_theory']:.3f} "
            f"| {s['conformal_expected']:.4f} ({s['n_cal']}) "
            f"| {_flag(checks['conformal_within_3se'])} | {s['wall_s'] / 60:.1f} min |"
        )
    return head + "\n".join(rows) + "\n"


def _split_range(args: argparse.Namespace, n_splits: int) -> range:
    first = args.split_from or 0
    if not 0 <= first < n_splits:
        raise SystemExit(f"--split-from {first}: the data set has {n_splits} splits")
    k = args.splits or (2 if args.fast else n_splits - first)
    return range(first, min(first + k, n_splits))


def run_dataset(root: Path, args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    start = time.perf_counter()
    ds = load(root)
    chosen = _split_range(args, ds["n_splits"])
    rates, taus = ds["dropout_rates"], ds["taus"]  # taus unused by a learned noise
    epochs = args.epochs or ds["n_epochs"] * args.epochs_mult
    if args.fast:  # smoke mode: a 2-point grid and few epochs
        rates, taus = [rates[0], rates[-1]], [taus[len(taus) // 2]]
        epochs = min(epochs, 50)
    data = [(ds["x"][ds["train"][i]], ds["y"][ds["train"][i]]) for i in chosen]
    results = train_mlps(
        data,
        seeds=[args.seed + i for i in chosen],  # a split's seed does not depend on the range
        hidden=(ds["n_hidden"],),
        dropout_rates=rates,
        taus=taus,
        epochs=epochs,
        val_passes=args.val_T,
        progress=args.progress,
        noise="learned" if args.noise == "learned" else "grid",
    )
    out_dir = args.out / ds["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = []
    for i, r in zip(chosen, results, strict=True):
        split = run_split(ds, i, r, args)
        (out_dir / f"split_{i}.json").write_text(json.dumps(split, indent=1))
        splits.append(split)
        print(
            f"{ds['name']} split {i}: rmse {split['rmse']:.3f} ll {split['test_ll']:.3f} "
            f"p {r.dropout_rate} tau {split['chosen']['tau']} "
            f"conformal {split['conformal_95']['coverage']:.3f}",
            flush=True,
        )
    if args.split_from is not None:  # one part of a data set: the summary comes from --summarise
        print(f"{ds['name']}: splits {chosen.start}-{chosen.stop - 1} written; --summarise later")
        return None
    summary = summarise(splits, time.perf_counter() - start, command)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarise_dir(root: Path, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Summary of the split files already under <out>/<dataset> (runs in several processes).

    Wall time: the summed per-split compute of the processes is not a wall time, so `wall_s` is
    the longest group's (training time of its stack plus its splits' prediction), assuming the
    groups ran side by side; `command` names the summarising call.
    """
    name = load(root)["name"]
    files = sorted((args.out / name).glob("split_*.json"), key=lambda p: int(p.stem[6:]))
    if not files:
        raise SystemExit(f"no split files under {args.out / name}")
    splits = [json.loads(p.read_text()) for p in files]
    groups: dict[tuple[float, float], float] = {}
    for s in splits:
        t = s["timings"]
        key = (t["grid_train_s"], t["refit_s"])  # identical for the splits of one stack
        groups[key] = groups.get(key, t["grid_train_s"] + t["grid_score_s"] + t["refit_s"])
        groups[key] += t["predict_s"]
    summary = summarise(splits, max(groups.values()), command)
    (args.out / name / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def repo_relative(arg: str, root: Path = ROOT) -> str:
    """A command-line argument as the results record it: an absolute path relative to the
    repository (`../shared/datasets/uci/yacht`, as the docs name data), anything else as given
    (a relative path already is relative to the repository, where the command runs)."""
    return os.path.relpath(arg, root) if os.path.isabs(arg) else arg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.uci", description=__doc__.split("\n")[0])
    ap.add_argument("datasets", nargs="+", type=Path, help="directories in the UCI layout")
    ap.add_argument("--fast", action="store_true", help="smoke mode: 2 splits, tiny grid, small T")
    ap.add_argument("--splits", type=int, default=0, help="K splits (default: all)")
    ap.add_argument("--split-from", type=int, default=None, help="first split (part of a run)")
    ap.add_argument(
        "--summarise", action="store_true", help="only summarise the split files under --out"
    )
    ap.add_argument("--T", type=int, default=None, help="MC passes on test rows (10000)")
    ap.add_argument("--cal-T", type=int, default=None, help="passes, conformal model (1000)")
    ap.add_argument("--val-T", type=int, default=None, help="passes, grid selection (200)")
    ap.add_argument("--epochs-mult", type=int, default=10, help="x n_epochs.txt (2016: 10)")
    ap.add_argument("--epochs", type=int, default=0, help="override the epoch count")
    ap.add_argument("--out", type=Path, default=Path("bench/results/uci"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-rows", type=int, default=1 << 18, help="rows per MC forward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--progress", action="store_true", help="progress bars (rich)")
    ap.add_argument(
        "--noise",
        choices=("fixed", "learned"),
        default="fixed",
        help="fixed: the tau grid (2016); learned: a log-variance head, Gaussian NLL",
    )
    args = ap.parse_args(argv)
    small = args.fast
    args.T = args.T or (100 if small else 10_000)
    args.cal_T = args.cal_T or (100 if small else 1000)
    args.val_T = args.val_T or (50 if small else 200)
    torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m bench.uci " + " ".join(repo_relative(a) for a in given)
    for root in args.datasets:
        if args.summarise:
            summary: dict[str, Any] | None = summarise_dir(root, args, command)
        else:
            summary = run_dataset(root, args, command)
        if summary is not None:
            print(json.dumps({k: summary[k] for k in ("dataset", "rmse", "test_ll", "checks")}))
    summaries = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/summary.json"))]
    text = table(summaries)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
