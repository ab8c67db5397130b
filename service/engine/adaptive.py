"""Adaptive passes (`samples: "auto"`): run passes until the answer's decisions are sure.

A request runs `first` passes (a classifier: its model's default), then doubles them, until
every input is settled or `max_samples` is reached. An input is settled when each decision
the answer makes is either more than `Z_DECIDED` Monte Carlo standard errors (se) from its
boundary, so more passes would not flip it, or is known to within `tolerance`:

- classifiers (tolerance in probability units): the label (the gap between the two most probable
  classes), each class's membership of the conformal prediction set (p_k against 1 - q), and the
  epistemic referral (mutual information against its threshold; its se by the delta method over
  the passes: the expected entropy's alone was 3.6 times too small when passes flip between
  confident labels, the very case the referral is for); and nothing is settled before the
  model's default passes, where a classifier starts (a rare flip of label unseen in fewer
  makes every standard error look small);
- regressors (tolerance as a fraction of the predictive std): the interval end points
  mean -+ z std at each requested level (q std for conformal intervals: q is the calibrated
  factor, often over z), with se by the delta method from the passes' means and variances, and
  the epistemic referral (epistemic std against its threshold; each target's own threshold for
  a multi-target model).

The masks of pass t depend on (seed, layer, t, row) only (masks.py), so the first T passes of a
longer run are the T passes of a shorter one: the answer after n passes is bit for bit the
answer of a request with `samples = n` and the same seed, and the passes used are a function of
the seed. Each doubling reruns the passes already done (the sampler starts at pass 0), so the
compute is below twice the final pass count. Requests stop independently: `run` takes several
and drops each from the next chunk once it is settled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from service.bundle.calibration import ReferralPolicy
from service.engine import heads
from service.engine.model import ServedModel
from service.engine.params import PredictParams, new_seed
from service.engine.prediction import Prediction
from service.engine.regression import noise_variance
from service.engine.sampler import MCRequest
from service.engine.summaries import as_samples, entropy, min_samples_for_quantile, softmax
from service.errors import InvalidInputError

Z_DECIDED = 3.0  # a decision this many standard errors from its boundary is taken as settled


@dataclass(frozen=True)
class Adaptive:
    max_samples: int = 1000
    tolerance: float = 0.01  # probability units (classifiers), fraction of std (regressors)
    first: int = 32  # passes of the first chunk

    def __post_init__(self) -> None:
        if not 2 <= self.first <= self.max_samples:
            raise InvalidInputError(
                f"adaptive passes need 2 <= first ({self.first}) <= max_samples "
                f"({self.max_samples}); raise max_samples"
            )
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise InvalidInputError(
                f"tolerance must be a number > 0 (got {self.tolerance!r}), e.g. 0.01"
            )


def _decided(margin: np.ndarray, se: np.ndarray, tolerance: float | np.ndarray) -> np.ndarray:
    return (np.abs(margin) > Z_DECIDED * se) | (se <= tolerance)


def _classifier(
    model: ServedModel, z: np.ndarray, levels: tuple[float, ...], tol: float
) -> np.ndarray:
    cal = model.calibrator
    t = z.shape[0]
    p_t = softmax(cal.logits(z), axis=-1)  # [T, B, K], as the served summary
    p = p_t.mean(axis=0)
    order = np.argsort(-p, axis=-1, kind="stable")
    a, b = order[:, 0], order[:, 1]
    rows = np.arange(p.shape[0])
    gap_t = p_t[:, rows, a] - p_t[:, rows, b]  # [T, B]
    ok = _decided(gap_t.mean(0), gap_t.std(0, ddof=1) / math.sqrt(t), tol)
    se_p = p_t.std(axis=0, ddof=1) / math.sqrt(t)  # [B, K]
    policy = cal.policy
    # The sets the answer shows, one per requested level, and the one the referral's set-size
    # trigger reads, at the policy's own level.
    read = {policy.level} if policy.max_set_size is not None else set()
    for level in sorted(set(levels) | read) if cal.calibrated else ():
        q = cal.q(level)
        if math.isfinite(q):
            ok &= _decided(p - (1.0 - q), se_p, tol).all(axis=-1)
    if policy.epistemic is not None:
        mi = entropy(p, axis=-1) - entropy(p_t, axis=-1).mean(0)
        ok &= _decided(mi - policy.epistemic, mi_se(p_t), tol)
    # Nothing is settled before a fixed request's passes: a rare flip of label unseen in the
    # first 32 makes every standard error look small, the MI's and the set's (digits rows at
    # 3x the referral threshold went unreferred in 11-15 % of seeds, every one at 32; a set
    # trigger likewise, review R10). `first_passes` starts classifiers there.
    return np.asarray(ok & (t >= model.manifest.defaults.samples))


def mi_se(p_t: np.ndarray) -> np.ndarray:
    """The Monte Carlo standard error of the mutual information H(mean p) - mean H(p_t) of
    passes' probabilities p_t [T, B, K], by the delta method: per pass, its first-order terms
    dH/dp . (p_t - mean p) - (H(p_t) - mean H)."""
    p = p_t.mean(axis=0)
    h_t = entropy(p_t, axis=-1)  # [T, B]
    grad = -(np.log(np.clip(p, 1e-300, None)) + 1.0)  # dH/dp at the mean, [B, K]
    g_t = np.sum(grad * (p_t - p), axis=-1) - (h_t - h_t.mean(axis=0))
    return np.asarray(g_t.std(axis=0, ddof=1) / math.sqrt(p_t.shape[0]))


def _regressor(model: ServedModel, raw: np.ndarray, p: PredictParams, tol: float) -> np.ndarray:
    f, noise = heads.split(raw.astype(np.float64), model.manifest.aleatoric)
    # A NaN or infinite output is the fixed request's error now, not after max_samples passes.
    f = as_samples(f, "samples")
    s2 = None if noise is None else noise_variance(noise, f.shape)
    t = f.shape[0]
    mean = f.mean(axis=0)
    dev2 = (f - mean) ** 2  # [T, B, D]
    var_e = dev2.mean(axis=0)
    if s2 is None:
        var_a, spread = np.zeros_like(mean), dev2
    elif s2.ndim == 0:
        var_a, spread = np.full_like(mean, float(s2)), dev2
    else:
        var_a, spread = s2.mean(axis=0), dev2 + s2  # one per-pass term: their covariance counts
    std = np.sqrt(var_e + var_a)
    floor = np.maximum(std, 1e-12)
    ok = np.ones(mean.shape[0], dtype=bool)
    cal = model.calibrator
    for level in p.confidence:
        if p.interval == "quantile":  # end points that are quantiles have their own error
            ok &= (_quantile_se(f, s2, mean, std, level) <= tol * floor).all(axis=-1)
            continue
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        # The end points served: mean -+ q std per target for conformal intervals.
        factor = np.asarray(cal.qs(level)) if p.interval == "conformal" else np.full(1, z)
        factor = np.where(np.isfinite(factor), factor, z)
        ok &= (end_point_se(f, spread, floor, factor) <= tol).all(axis=-1)
    for d, thr in enumerate(_epistemic_thresholds(cal.policy, cal.targets)):
        if thr is None:
            continue
        epi = np.sqrt(var_e[:, d])
        # The epistemic std's own passes' spread: the noise's is no part of it.
        se_epi = dev2[:, :, d].std(axis=0, ddof=1) / (2.0 * math.sqrt(t) * np.maximum(epi, 1e-12))
        ok &= _decided(epi - thr, se_epi, tol * max(thr, 1e-12))
    return ok


def end_point_se(
    f: np.ndarray, spread: np.ndarray, std: np.ndarray, factor: np.ndarray
) -> np.ndarray:
    """The larger Monte Carlo se, in units of `std` [B, D], of the end points mean -+ factor std
    of passes f [T, B, D] whose total variance's per-pass terms are `spread`. Each pass's
    first-order part (the delta method): the mean's, f_t - mean, and the std's, (spread_t -
    mean spread) / (2 std), taken together: with skewed passes they move together, and as two
    independent errors the se of one end was 0.75 of its real spread, of the other 1.25 (a
    reviewer's 20,000 runs of exponential passes). In units of std: a learned variance near
    e^600 squared would overflow."""
    u = (f - f.mean(axis=0)) / std
    w = spread / std**2
    w = (w - w.mean(axis=0)) / 2.0
    ends = [(u + k * w).std(axis=0, ddof=1) for k in (factor, -factor)]
    return np.asarray(np.maximum(*ends) / math.sqrt(f.shape[0]))


def _quantile_se(
    f: np.ndarray, s2: np.ndarray | None, mean: np.ndarray, std: np.ndarray, level: float
) -> np.ndarray:
    """The larger Monte Carlo standard error of the two quantile end points at `level`, from
    the passes (f [T, B, D]; the noise's variances s2, if any). Without noise, by order
    statistics: the p-quantile of T passes moves about as far as the quantiles at p -+
    sqrt(p (1 - p) / T) lie apart, halved. With noise, of the mixture of N(f_t, s_t^2) at the
    Gaussian end point q: sd over passes of Phi((q - f_t) / s_t) / sqrt(T), over the mixture's
    density at q. (The draws that sample the noise add an error more passes do not reduce.) The
    Gaussian end points' se under-stated these 2-4 times (a reviewer's simulation)."""
    t = f.shape[0]
    alpha = 1.0 - level
    worst = np.zeros_like(mean)
    for p in (alpha / 2.0, 1.0 - alpha / 2.0):
        if s2 is None or not np.any(s2 > 0):
            d = math.sqrt(p * (1.0 - p) / t)
            lo, hi = np.quantile(f, [max(p - d, 0.0), min(p + d, 1.0)], axis=0)
            se = (hi - lo) / 2.0
        else:
            q = mean + NormalDist().inv_cdf(p) * std  # [B, D]
            sd = np.sqrt(np.broadcast_to(s2, f.shape))
            u = torch.from_numpy(np.ascontiguousarray((q - f) / sd))
            cdf = torch.special.ndtr(u).numpy()
            density = (np.exp(-0.5 * u.numpy() ** 2) / (math.sqrt(2 * math.pi) * sd)).mean(0)
            se = cdf.std(axis=0, ddof=1) / math.sqrt(t) / np.maximum(density, 1e-300)
        worst = np.maximum(worst, se)
    return worst


def _epistemic_thresholds(policy: ReferralPolicy, targets: Sequence[str]) -> list[float | None]:
    """Each target's epistemic threshold: the policy's own for one target; a multi-target
    model's are per target (`policy.targets`), and `policy.epistemic` then does not apply."""
    if len(targets) == 1:
        return [policy.epistemic]
    per = policy.targets or {}
    return [per[name].epistemic if name in per else None for name in targets]


def settled(model: ServedModel, samples: np.ndarray, p: PredictParams, tolerance: float) -> bool:
    """Whether every input of one request's samples [T, B, outputs] is settled."""
    if model.manifest.task == "classification":
        z = as_samples(samples, "logits")  # NaN: the fixed request's error, not max_samples
        return bool(_classifier(model, z, p.confidence, tolerance).all())
    return bool(_regressor(model, samples, p, tolerance).all())


def first_passes(p: PredictParams, a: Adaptive, task: str = "regression", default: int = 0) -> int:
    # Quantile intervals need 2 / alpha passes at least: start there rather than refuse. Past
    # max_samples a classifier runs max_samples, and its probability intervals at that level are
    # left out with a warning, as a fixed request's are (it was refused, told to use gaussian
    # intervals, which classifiers do not have); a regressor is refused. A classifier starts at
    # the model's `default` passes: none of its decisions settles before (_classifier).
    need = [min_samples_for_quantile(c) for c in p.confidence] if p.interval == "quantile" else []
    own = [min(default, a.max_samples)] if task == "classification" else []
    start = max([a.first, *need, *own])
    if start > a.max_samples and task == "classification":
        return a.max_samples
    if start > a.max_samples:
        raise InvalidInputError(
            f"quantile intervals at these levels need {start} passes, over max_samples "
            f"{a.max_samples}; raise max_samples or use interval=gaussian"
        )
    return start


def run(
    model: ServedModel, xs: Sequence[np.ndarray], params: Sequence[PredictParams], a: Adaptive
) -> list[Prediction]:
    """Answer each request (inputs xs[i], parameters params[i], whose `samples` is ignored) with
    as many passes as it needs; `Prediction.samples` is the number used."""
    seeds = [p.seed if p.seed is not None else new_seed() for p in params]
    m = model.manifest
    passes = [first_passes(p, a, m.task, m.defaults.samples) for p in params]
    sites = [model.sites_for(p) for p in params]
    done: dict[int, tuple[np.ndarray, int]] = {}
    while len(done) < len(xs):
        todo = [i for i in range(len(xs)) if i not in done]
        reqs = [MCRequest(xs[i], passes[i], seeds[i], sites=sites[i]) for i in todo]
        for i, out in zip(todo, model.sample(reqs), strict=True):
            more = next_passes(model, out, params[i], a)
            if more is None:
                done[i] = (out, passes[i])
            else:
                passes[i] = more
    answers = []
    for i, x in enumerate(xs):
        out, t = done[i]
        p = dataclasses.replace(params[i], samples=t, seed=seeds[i])
        model.check_params(p)
        req = MCRequest(x, t, seeds[i], sites=sites[i])
        answers.append(mark(model.summarize(out, req, p), a))
    return answers


def next_passes(
    model: ServedModel, samples: np.ndarray, p: PredictParams, a: Adaptive
) -> int | None:
    """After a chunk of `samples` [T, B, outputs]: None when the request is done (settled, or
    at max_samples), else the passes of its next chunk (twice as many, at most max_samples)."""
    t = int(samples.shape[0])
    if t >= a.max_samples or settled(model, samples, p, a.tolerance):
        return None
    return min(2 * t, a.max_samples)


def mark(pred: Prediction, a: Adaptive) -> Prediction:
    """Say in the answer that its passes were chosen adaptively, and how many."""
    pred.adaptive = True
    pred.warnings.append(
        f"adaptive passes: {pred.samples} used (max_samples {a.max_samples}, "
        f"tolerance {a.tolerance:g})"
    )
    return pred
