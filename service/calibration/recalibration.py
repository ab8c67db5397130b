"""`service calibrate`: write a calibrated copy of a bundle as a new, immutable version.

The source bundle is only read. The new version holds byte copies of its artifacts (same
hashes) and a manifest, written through the pydantic `Manifest`, with a `calibration` section
(split-conformal scores, the temperature of a classifier or, with `--method vector|auto`,
its per-class scale and bias (selection.py), the passes and seed used), a `referral` policy
whose thresholds come from the calibration rows (`_policy`), and for a regressor the default
interval `conformal`. It is staged in a hidden directory and renamed into place, so a
failed run leaves nothing behind and the registry never sees half a bundle.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle.calibration import Calibration, ReferralPolicy, TargetReferral
from service.bundle.fingerprint import sha256_file
from service.bundle.load import TrustPolicy, load_bundle
from service.bundle.manifest import MANIFEST_NAME, Manifest
from service.calibration import selection, temperature
from service.calibration.data import read
from service.calibration.labelled import Labelled, overlaps
from service.engine import conformal, heads
from service.engine.model import ServedModel
from service.engine.referral import budget_threshold, outside_training, relative_width
from service.engine.registry import whole
from service.engine.regression import summarize_regression
from service.engine.sampler import MCRequest
from service.engine.summaries import summarize_classification
from service.errors import BundleError, InvalidInputError
from service.packaging import destination

PERCENTILE = 90.0  # the default policy refers 100 - PERCENTILE % of the calibration rows
# Text with a word list: the unfamiliar-words threshold refers this share of the calibration
# texts (the false alarms it costs on texts like them), out of the policy's total share.
UNFAMILIAR_RATE = 0.01


@dataclass
class Result:
    path: Path
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)


def next_version(repo: Path, name: str, source: str) -> str:
    """One more than the largest integer version of `name` in `repo` (or than the source's)."""
    found = [int(source)] if whole(source) else []
    model_dir = repo / name
    if model_dir.is_dir():
        found += [int(p.name) for p in model_dir.iterdir() if p.is_dir() and whole(p.name)]
    return str(max(found, default=0) + 1)


def _fit(
    served: ServedModel,
    data: Labelled,
    samples: int,
    seed: int,
    percentile: float,
    one_se: bool,
    method: selection.Method = "temperature",
    method_flag: str = "--method",
) -> tuple[Calibration, ReferralPolicy, float]:
    """The calibration, the referral policy, and the share of rows extrapolation refers alone
    (the training ranges' verdict; 0 for a text model, whose word check has its own budget)."""
    m = served.manifest
    # Scores from the dropout sites the model serves with (its manifest's default).
    req = MCRequest(data.x, samples, seed, sites=m.sampled_sites)
    out = served.sample([req])[0]  # [T, N, outputs]
    level = m.defaults.confidence
    fps = data.fingerprints()
    policy_base = m.referral or ReferralPolicy()
    nominal = 1.0 - percentile / 100.0
    familiarity = served.calibrator.familiarity
    unfamiliar = None
    if familiarity is not None:  # a text's features are its words (familiar.py)
        shares = familiarity.share(data.x)
        none = np.zeros(data.n, dtype=bool)
        unfamiliar = budget_threshold(shares, none, UNFAMILIAR_RATE)
        extrapolating = shares > unfamiliar
    else:
        flat = data.x.reshape(data.n, -1).astype(np.float64)
        extrapolating = np.array([bool(o) for o in outside_training(flat, m.inputs)], dtype=bool)
    ext_name = "extrapolation" if familiarity is None else "unfamiliar words"
    if not policy_base.extrapolation:
        extrapolating[:] = False
    share = float(extrapolating.mean()) if familiarity is None else 0.0
    # Extrapolation alone over the target (ranges narrower than the data): the other triggers
    # are fitted as if it were off, so that switching it off leaves a policy that refers its
    # share; counted in, they were left nothing, and switching it off referred no one.
    counted = extrapolating if share <= nominal else np.zeros_like(extrapolating)

    def derived(parts: dict[str, np.ndarray]) -> str:
        rates = ", ".join(f"{k} {100 * v.mean():.1f} %" for k, v in parts.items())
        if share > nominal:  # it alone refers more than the target: said, not "together 10 %"
            return (
                f"{ext_name} alone refers {100 * share:.3g} % of the {data.n} calibration rows, "
                f"more than the {100 * nominal:.3g} % (100 - percentile {percentile:g}) the "
                f"triggers were to refer together; the others are set to refer "
                f"{100 * nominal:.3g} % without it; by trigger (a row can have several): {rates}"
            )
        return (
            f"the triggers together refer {100 * nominal:.3g} % (100 - percentile "
            f"{percentile:g}) of the {data.n} calibration rows; by trigger (a row can have "
            f"several): {rates}"
        )

    if m.task == "classification":
        choice = selection.choose(out, data.y, method, one_se=one_se, flag=method_flag)
        t, t_min = choice.candidate, choice.minimum  # the temperature candidate, as before
        s = summarize_classification(
            out,
            levels=(0.5,),
            temperature=choice.temperature,
            class_scale=choice.scale,
            class_bias=choice.bias,
        )
        # vector scaling was fitted on these rows: they are scored by fits that did not see them
        probs = s.probabilities if choice.held_out is None else choice.held_out
        scores = np.sort(conformal.classification_scores(probs, data.y))
        cal = Calibration(
            score="one-minus-probability",
            scores=scores.tolist(),
            temperature=choice.temperature,
            class_scale=choice.scale,
            class_bias=choice.bias,
            fit=choice.fit,
            temperature_fit={
                "rule": "one-standard-error" if one_se else "minimum-nll",
                "nll_at_1": temperature.nll(out, data.y),
                "nll": temperature.nll(out, data.y, t),
                "minimum_nll_temperature": t_min,
                "minimum_nll": temperature.nll(out, data.y, t_min),
            },
            n=data.n,
            samples=samples,
            seed=seed,
            row_fingerprints=fps,
        )
        # Jointly, so the policy refers its nominal share of in-distribution rows (one trigger at
        # a time, "any ambiguous set" alone referred 80 % of a user's held-out rows): the set
        # trigger gets half the share, epistemic uncertainty what the others leave.
        sizes = conformal.prediction_set(s.probabilities, conformal.quantile(scores, level))
        n_set = sizes.sum(axis=1)
        k = sizes.shape[1]
        most: int | None = next(
            (j for j in range(1, k) if ((n_set == 0) | (n_set > j)).mean() <= nominal / 2), k
        )
        by_set = (n_set == 0) | (n_set > (most or k))
        if by_set.mean() > nominal / 2:  # empty sets alone over the share: the trigger is off
            most, by_set = None, np.zeros_like(by_set)  # (4.7 % referred against 1 % asked)
        mi = s.mutual_information
        epistemic = budget_threshold(mi, counted | by_set, nominal)
        policy = ReferralPolicy(
            level=level,
            epistemic=epistemic,
            max_set_size=most,
            extrapolation=policy_base.extrapolation,
            unfamiliar_words=unfamiliar,
            derived_from=derived(
                {
                    ext_name: extrapolating,
                    "prediction_set": by_set,
                    "epistemic": mi > epistemic,
                }
            ),
        )
        return cal, policy, share
    means, noise = heads.split(out, m.aleatoric)
    r = summarize_regression(means, levels=(level,), noise_var=noise)
    y = data.y.reshape(data.n, -1)  # [N, targets]
    # A learned noise varies by input, so its size can refer too; a fixed one cannot tell inputs
    # apart.
    learned = m.aleatoric.kind == "heteroscedastic"
    per_target: dict[str, list[float]] = {}
    thresholds: dict[str, TargetReferral] = {}
    # Jointly, as for classifiers, per target: the width trigger gets half of what extrapolation
    # leaves, a learned noise's size half of what is then left, epistemic uncertainty the rest.
    parts: dict[str, np.ndarray] = {ext_name: extrapolating}
    names = m.outputs.target_names

    def tag(name: str) -> str:
        return f" ({name})" if len(names) > 1 else ""

    for d, name in enumerate(m.outputs.target_names):
        scores = np.sort(conformal.regression_scores(y[:, d], r.mean[:, d], r.std[:, d]))
        per_target[name] = scores.tolist()
        half = conformal.quantile(scores, level) * np.maximum(r.std[:, d], conformal.STD_FLOOR)
        widths = relative_width(r.mean[:, d], half)
        taken = counted.copy()
        width = None
        if np.isfinite(widths).all():
            width = budget_threshold(widths, taken, _half_of_rest(taken, nominal))
            parts[f"interval_width{tag(name)}"] = widths > width
            taken |= widths > width
        aleatoric = None
        if learned:
            ale = r.aleatoric_std[:, d]
            aleatoric = budget_threshold(ale, taken, _half_of_rest(taken, nominal))
            parts[f"aleatoric{tag(name)}"] = ale > aleatoric
            taken |= ale > aleatoric
        eps = r.epistemic_std[:, d]
        epistemic = budget_threshold(eps, taken, nominal)
        parts[f"epistemic{tag(name)}"] = eps > epistemic
        thresholds[name] = TargetReferral(
            epistemic=epistemic, aleatoric=aleatoric, relative_width=width
        )
    multi = len(per_target) > 1
    cal = Calibration(
        score="abs-residual-over-std",
        scores=[] if multi else next(iter(per_target.values())),
        target_scores=per_target if multi else None,
        n=data.n,
        samples=samples,
        seed=seed,
        row_fingerprints=fps,
    )
    if multi:
        policy = ReferralPolicy(
            level=level,
            targets=thresholds,
            extrapolation=policy_base.extrapolation,
            unfamiliar_words=unfamiliar,
            derived_from=f"per target: {derived(parts)}",
        )
    else:
        only = next(iter(thresholds.values()))
        policy = ReferralPolicy(
            level=level,
            **only.model_dump(),
            extrapolation=policy_base.extrapolation,
            unfamiliar_words=unfamiliar,
            derived_from=derived(parts),
        )
    return cal, policy, share


def _half_of_rest(taken: np.ndarray, nominal: float) -> float:
    """The share of rows a trigger may refer: what is taken, plus half of what is left."""
    return float(taken.mean() + max(nominal - taken.mean(), 0.0) / 2)


def calibrate_bundle(
    source: Path | str,
    data_path: Path | str,
    repo: Path | str,
    *,
    samples: int | None = None,
    seed: int = 0,
    version: str | None = None,
    percentile: float = PERCENTILE,
    one_se: bool = True,
    policy: TrustPolicy | None = None,
    target: str | None = None,
    method: str = "temperature",
    method_flag: str = "--method",
) -> Result:
    """Calibrate the bundle at `source` on `data_path`; write `<repo>/<name>/<version>/`.

    ``method`` (classifiers): "temperature", "vector" or "auto" (selection.py); ``method_flag``
    names the option that set it in messages (`train --calibration-method`)."""
    how = selection.check_method(method)
    if not 0.0 < percentile < 100.0:  # -5 or 0 wrote a version that referred every answer
        raise InvalidInputError(
            f"--percentile {percentile:g} must lie between 0 and 100 (90: the referral triggers "
            "together refer 10 % of the calibration rows)"
        )
    source, repo = Path(source), Path(repo)
    bundle = load_bundle(source, policy)
    served = ServedModel(bundle, device="cpu")
    m = bundle.manifest
    if m.task == "regression" and how != "temperature":
        raise InvalidInputError(
            f"calibration method {how!r} scales a classifier's logits; {m.name} is a regressor "
            "(leave the method at its default)"
        )
    data = read(data_path, m, target, bundle.tokenizer)
    # Calibrating on trained-on rows voids the guarantee; on test rows, spoils later evaluation.
    warnings = [*data.notes, *overlaps(data, m, "calibration", ("train", "test"), calibrated=False)]
    t = samples if samples is not None else m.defaults.samples
    version = version or next_version(repo, m.name, m.version)
    destination.check(m.name, version)
    dest = repo / m.name / version
    destination.refuse_existing(dest)
    cal, referral, ext_share = _fit(served, data, t, seed, percentile, one_se, how, method_flag)
    cal = cal.model_copy(
        update={
            "data": {"file": Path(data_path).name, "sha256": data.sha256, "rows": data.n},
            "source": {"version": m.version, "digest": bundle.digest},
        }
    )
    defaults = m.defaults.model_copy(
        update={"interval": "conformal"} if m.task == "regression" else {}
    )
    fields = m.model_dump() | {
        "version": version,
        "calibration": cal.model_dump(),
        "referral": referral.model_dump(),
        "defaults": defaults.model_dump(),
    }
    new = Manifest.model_validate(fields)  # validates the sections and their fit to the task
    # Staged in a hidden directory and renamed into place (destination.py): a failed run leaves
    # nothing behind and the registry never sees half a bundle.
    with destination.staged(repo, m.name, version, "calibrate") as staged:
        for fname, art in sorted(m.artifacts.items()):
            shutil.copyfile(source / fname, staged / fname)
            if sha256_file(staged / fname) != art.sha256:
                raise BundleError(f"{source / fname}: changed while being copied")
            (staged / fname).chmod(0o644)
        (staged / MANIFEST_NAME).write_bytes(new.dumps())
        (staged / MANIFEST_NAME).chmod(0o644)
        load_bundle(staged, policy)  # what was written must load, before the registry sees it
    if referral.unfamiliar_words is not None and referral.unfamiliar_words >= 1.0:
        warnings.append(
            f"the unfamiliar-words check will never refer a text: more than "
            f"{100 * UNFAMILIAR_RATE:g} % of the {data.n} calibration texts have no word of the "
            "word list (only digits or codes, another language?), so its threshold is 100 %; "
            "check the calibration data, or set this model's unfamiliar_words in "
            "MCSERVE_REFERRAL"
        )
    fitted = new.calibration.temperature if new.calibration is not None else None
    low, high = temperature.BOUNDS
    if fitted is not None and fitted != 1.0 and not low * 1.1 < fitted < high / 1.1:
        warnings.append(
            f"the temperature ({fitted:.4g}) is at the edge of its range ({low:g} to "
            f"{high:g}): the {data.n} calibration rows cannot pin it down (too few rows, or too "
            "few errors); check them, or calibrate on more"
        )
    if ext_share > 1.0 - percentile / 100.0:
        warnings.append(
            f"extrapolation alone refers {100 * ext_share:.3g} % of the {data.n} calibration "
            "rows, more than the "
            f"{100 - percentile:.3g} % the policy was to refer: the training ranges are narrower "
            "than in-distribution data (per-value ranges of images or audio are), so most "
            "answers will be referred; package it with wider training_ranges or none and "
            "calibrate again, or set this model's extrapolation to false in MCSERVE_REFERRAL "
            f"(the other triggers are set to refer {100 - percentile:.3g} % without it)"
        )
    level = m.defaults.confidence
    if data.n < conformal.min_n(level):
        warnings.append(
            f"{data.n} calibration rows are too few for a finite conformal threshold at the "
            f"default level {level:g} (needs {conformal.min_n(level)})"
        )
    return Result(dest, new, warnings)
