"""Choosing a classifier's calibration method: temperature or vector scaling.

`calibrate --method temperature` (the default) fits one temperature, as always. `vector` fits a
per-class scale and bias (vector.py). `auto` fits both on each of `FOLDS` stratified folds of
the calibration rows (a fixed fold seed), scores each on the rows it did not see, and takes the
method with the lower cross-validated NLL: vector scaling wins where the network favours some
classes over others, and loses (more parameters, same fit) where one temperature says it all.
Both CV NLLs are computed for `vector` and `auto` and recorded in the manifest
(`calibration.fit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from service.bundle.calibration import Calibration
from service.calibration import temperature, vector
from service.errors import InvalidInputError

Method = Literal["temperature", "vector", "auto"]
METHODS: tuple[str, ...] = ("temperature", "vector", "auto")
FOLDS = 5
FOLD_SEED = 20170614  # fixed: the same rows give the same folds, so the choice is reproducible


@dataclass(frozen=True)
class Choice:
    method: Literal["temperature", "vector"]
    temperature: float  # 1.0 for vector scaling
    scale: list[float] | None = None
    bias: list[float] | None = None
    fit: dict[str, float | str] = field(default_factory=dict)  # the manifest's calibration.fit
    candidate: float = 1.0  # the temperature candidate (one-SE rule or minimum, as asked)
    minimum: float = 1.0  # the plain NLL-minimising temperature
    # Vector scaling: each calibration row's probabilities from the cross-validation's fold fit
    # that did not see it, for the conformal scores. 2K parameters fitted on the rows that then
    # give the scores made them optimistic, and the sets undercovered (a simulation: 0.79 at
    # level 0.9 with 6 classes and 30 rows, 0.87 with 10 and 200). A temperature, one
    # parameter, keeps its in-sample scores.
    held_out: np.ndarray | None = None


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise InvalidInputError(
            f"calibration method {method!r}: use one of {', '.join(METHODS)} (default temperature)"
        )
    return method  # type: ignore[return-value]


def folds(y: np.ndarray, k: int = FOLDS, seed: int = FOLD_SEED) -> np.ndarray:
    """Each row's fold in 0..k-1: every class's rows shuffled and dealt round, so each fold holds
    about 1/k of every class (the deal continues across classes, so fold sizes differ by <= 1)."""
    yi = np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty(yi.size, dtype=np.int64)
    start = 0
    for c in np.unique(yi):
        rows = rng.permutation(np.flatnonzero(yi == c))
        out[rows] = (start + np.arange(rows.size)) % k
        start += rows.size
    return out


def cross_validated(logits: np.ndarray, y: np.ndarray, k: int = FOLDS) -> dict[str, np.ndarray]:
    """Each row's held-out NLL under each method, fitted on the other ``k - 1`` stratified folds
    of [T, N, K] logits. Both by minimum NLL: the one-SE rule's pull of T towards 1 is a
    preference, not a fit, and would hand vector scaling (whose common scale is free) an edge."""
    return _by_folds(logits, y, k)[0]


def _by_folds(
    logits: np.ndarray, y: np.ndarray, k: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    yi = np.asarray(y).astype(np.int64)
    fold = folds(yi, k)
    rows = {"temperature": np.zeros(yi.size), "vector": np.zeros(yi.size)}
    probs = np.full(z.shape[1:], np.nan)
    for f in range(k):
        test, train = fold == f, fold != f
        if not test.any():
            continue
        zt, yt = z[:, train], yi[train]
        t = temperature.fit(zt, yt, one_se=False)
        rows["temperature"][test] = temperature.row_nll(z[:, test], yi[test], t)
        try:
            v = vector.fit(zt, yt, start=1.0 / t)
        except vector.Diverged:  # no fit: this fold says vector scaling cannot be used here
            rows["vector"][test] = math.inf
            continue
        probs[test] = vector.mc_probabilities(z[:, test], v.scale, v.bias)
        rows["vector"][test] = vector.row_nll(z[:, test], yi[test], v.scale, v.bias)
    return rows, probs


def choose(
    logits: np.ndarray, y: np.ndarray, method: Method, one_se: bool = True, flag: str = "--method"
) -> Choice:
    """Fit the calibration ``method`` asks for on all rows ([T, N, K] logits, labels [N]); the
    two temperatures (candidate and minimum) are fitted once here and returned with it.
    ``flag``: the option that chose the method, for messages (`train`'s differs)."""
    check_method(method)
    z = np.asarray(logits, dtype=np.float64)
    t_min = temperature.fit(z, y, one_se=False)
    t = temperature.fit(z, y, one_se=True) if one_se else t_min
    return replace(_choose(z, y, method, one_se, t, t_min, flag), candidate=t, minimum=t_min)


def check_rows(
    method: str,
    y: np.ndarray,
    n_classes: int,
    *,
    flag: str = "--method",
    labels: Sequence[str] | None = None,
) -> list[int]:
    """Refuse calibration rows ``method`` cannot be fitted on; returns the classes without rows
    (``auto`` then keeps the temperature). `train` asks before it trains, so that nothing is
    written for a calibration bound to fail; ``flag`` names its option in the message."""
    n = int(np.asarray(y).size)
    if method != "temperature" and n < 2 * FOLDS:
        raise InvalidInputError(
            f"calibration method {method!r} needs at least {2 * FOLDS} calibration rows for its "
            f"{FOLDS}-fold cross-validation (got {n}); use {flag} temperature, or more rows"
        )
    counts = np.bincount(np.asarray(y).astype(np.int64), minlength=n_classes)
    missing = [int(c) for c in np.flatnonzero(counts == 0)]
    if method == "vector" and missing:
        # A class without rows would get its bias pushed down until it is never predicted.
        named = (
            f"the classes {[labels[k] for k in missing]} have"
            if labels is not None
            else f"class index {missing} has"
        )
        raise InvalidInputError(
            f"vector scaling needs calibration rows of every class: {named} none (its bias "
            f"would fall until it is never predicted); add rows of those classes or use {flag} "
            "temperature"
        )
    return missing


def _choose(
    z: np.ndarray, y: np.ndarray, method: Method, one_se: bool, t: float, t_min: float, flag: str
) -> Choice:
    if method == "temperature":
        return Choice("temperature", t)
    missing = check_rows(method, y, z.shape[-1], flag=flag)
    if missing:
        reason = f"no calibration rows of class index {missing}: vector scaling not fitted"
        fit: dict[str, float | str] = {"requested": method, "method": "temperature"}
        return Choice(
            "temperature", t, fit=fit | {"reason": reason, "nll": temperature.nll(z, y, t)}
        )
    rows, held_out = _by_folds(z, y, FOLDS)
    cv = {name: float(r.mean()) for name, r in rows.items()}
    if math.isfinite(cv["temperature"]) and cv["vector"] == math.inf:
        try:  # the fit on all rows says why (or, rarely, fits where a fold did not)
            vector.fit(z, y, start=1.0 / t_min)
            why = "vector scaling ran off on a cross-validation fold"
        except vector.Diverged as exc:
            why = str(exc)
        return _diverged(z, y, method, t, why, flag)
    if not all(math.isfinite(v) for v in cv.values()):
        raise InvalidInputError(
            f"calibration method {method!r}: the cross-validated NLL is not finite ({cv}); the "
            "model's logits on the calibration rows are not finite or a fit diverged: check the "
            f"model on these rows, or use {flag} temperature"
        )
    d = rows["temperature"] - rows["vector"]  # > 0 where vector scaling does better
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    # With the one-SE rule (the default, as for the temperature) vector scaling, the larger
    # model, must win by more than one standard error of the per-row difference.
    margin = se if one_se else 0.0
    chosen: Literal["temperature", "vector"] = (
        "vector"
        if method == "vector" or cv["temperature"] - cv["vector"] > margin
        else "temperature"
    )
    info: dict[str, float | str] = {
        "requested": method,
        "method": chosen,
        "rule": "one-standard-error" if one_se else "minimum-nll",
        "cv_folds": float(FOLDS),
        "cv_fold_seed": float(FOLD_SEED),
        "cv_nll_temperature": cv["temperature"],
        "cv_nll_vector": cv["vector"],
        "cv_nll_difference_se": se,
        "l2": vector.L2,
    }
    if chosen == "temperature":
        return Choice("temperature", t, fit=info | {"nll": temperature.nll(z, y, t)})
    try:
        v = vector.fit(z, y, start=1.0 / t_min)
    except vector.Diverged as exc:
        return _diverged(z, y, method, t, str(exc), flag)
    nll = vector.nll(z, y, v.scale, v.bias)
    if not math.isfinite(nll):
        raise InvalidInputError(
            f"vector scaling did not converge on these rows; use {flag} temperature"
        )
    fit = info | {"nll": nll}
    return Choice("vector", 1.0, v.scale.tolist(), v.bias.tolist(), fit, held_out=held_out)


def _diverged(
    z: np.ndarray, y: np.ndarray, method: Method, t: float, why: str, flag: str
) -> Choice:
    """`auto` keeps the temperature, saying why; `vector`, asked for by name, is refused."""
    if method == "vector":
        raise InvalidInputError(f"{why}; use {flag} temperature (or auto)")
    fit: dict[str, float | str] = {"requested": method, "method": "temperature", "reason": why}
    return Choice("temperature", t, fit=fit | {"nll": temperature.nll(z, y, t)})


def describe(cal: Calibration) -> list[str]:
    """A classifier calibration's method and fit, one line each (what `calibrate` prints)."""
    fit, tf = cal.fit, cal.temperature_fit
    lines = []
    if cal.class_scale is None:
        lines.append(
            f"method temperature: T = {cal.temperature or 1.0:.4g} (calibration NLL "
            f"{tf['nll_at_1']:.4f} at T=1 -> {tf['nll']:.4f}; plain minimiser "
            f"T={tf['minimum_nll_temperature']:.4g})"
        )
    else:
        scale = ", ".join(f"{v:.4g}" for v in cal.class_scale)
        bias = ", ".join(f"{v:+.4g}" for v in cal.class_bias or [])
        lines.append(
            f"method vector: class scale [{scale}], class bias [{bias}] (calibration NLL "
            f"{tf['nll_at_1']:.4f} at T=1 -> {fit['nll']:.4f}; temperature alone "
            f"T={tf['minimum_nll_temperature']:.4g})"
        )
    if fit and "reason" in fit:
        lines.append(f"--method {fit['requested']}: {fit['reason']} -> {fit['method']}")
    elif fit:
        lines.append(
            f"--method {fit['requested']}: {fit['cv_folds']:g}-fold cross-validated NLL "
            f"temperature {fit['cv_nll_temperature']:.4f}, vector {fit['cv_nll_vector']:.4f} "
            f"-> {fit['method']}"
        )
    return lines
