"""A served model: a verified bundle with its MC sampler and its deterministic predictor."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from service.bundle.load import LoadedBundle
from service.bundle.manifest import Manifest
from service.calibration.calibrator import Calibrator
from service.engine import heads
from service.engine.device import describe
from service.engine.masks import MAX_SEED
from service.engine.onnx_predictor import OnnxPredictor
from service.engine.prediction import Mode, Prediction
from service.engine.sampler import MCRequest, MCSampler
from service.engine.summaries import (
    ClassificationSummary,
    RegressionSummary,
    min_samples_for_quantile,
    summarize_classification,
    summarize_regression,
)
from service.errors import BundleError, InvalidInputError

IntervalMethod = Literal["gaussian", "quantile", "conformal"]


@dataclass(frozen=True)
class PredictParams:
    samples: int
    confidence: tuple[float, ...]
    seed: int | None = None
    mode: Mode = "mc"
    interval: IntervalMethod = "gaussian"
    # Which dropout sites to sample: "all", the last k (graph order), None: the model's default.
    dropout_sites: int | Literal["all"] | None = None


# Seeds need to be distinct, not secret: one OS-seeded generator per process (getrandom() per
# request was measurable under load).
_SEEDS = random.Random(int.from_bytes(os.urandom(16), "little"))


def new_seed() -> int:
    return _SEEDS.getrandbits(63) & MAX_SEED


def default_interval(manifest: Manifest) -> IntervalMethod:
    """The interval method a request gets when it names none, per task: a classifier's only
    method is per-class quantiles of p over the passes (its conformal answer is the prediction
    set, not an interval), whatever its manifest's `defaults.interval` says."""
    return "quantile" if manifest.task == "classification" else manifest.defaults.interval


def resolve_interval(
    manifest: Manifest,
    given: IntervalMethod | None,
    *,
    samples: int,
    levels: tuple[float, ...],
    mode: Mode,
) -> IntervalMethod:
    """A request's interval method: ``given``, else the task's default. A classifier refuses
    what it cannot honour, with the reason; quantiles asked for by name are refused at levels
    the samples cannot reach, by default such levels are dropped with a warning (`summarize`)."""
    if manifest.task == "regression":
        return given or manifest.defaults.interval
    if given in ("gaussian", "conformal"):
        also = (
            "; its conformal answer is the prediction_set, which a calibrated classifier "
            "always gives"
            if given == "conformal"
            else ""
        )
        raise InvalidInputError(
            f"interval={given} is for regressors: a classifier's per-class intervals are "
            f"quantiles of its class probabilities over the passes (interval=quantile, the "
            f"default){also}"
        )
    if given == "quantile" and mode == "mc":
        for level in levels:
            need = min_samples_for_quantile(level)
            if samples < need:
                raise InvalidInputError(
                    f"quantile intervals at {level:g} need samples >= {need} (got {samples}); "
                    f"ask for samples={need} or a lower confidence"
                )
    return "quantile"


class ServedModel:
    """Everything needed to answer requests for one bundle version."""

    def __init__(
        self,
        bundle: LoadedBundle,
        *,
        device: torch.device | str | None = None,
        row_budget: int = 16384,
        fused_masks: bool = True,
        onnx_threads: int = 1,
        referral_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        overrides = (referral_overrides or {}).get(self.manifest.name)
        try:
            self.calibrator = Calibrator(self.manifest, overrides)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise BundleError(
                f"{bundle.path}: the referral override for '{self.manifest.name}' is invalid "
                f"(setting referral): {exc}"
            ) from exc
        spec = self.manifest.inputs
        example = torch.zeros(2, *spec.shape, dtype=getattr(torch, spec.dtype))
        try:
            self.sampler = MCSampler(
                bundle.module,
                example,
                device=device,
                row_budget=row_budget,
                fused=None if fused_masks else False,  # None: wherever the kernel applies
            )
        except RuntimeError as exc:
            raise BundleError(
                f"{bundle.path}: the model does not accept inputs of shape {spec.shape}: {exc}"
            ) from exc
        self._check_layout()
        try:  # the default dropout-site setting's split, built now: errors at load, not later
            self.sampler.pin(self.manifest.sampled_sites)
        except InvalidInputError as exc:
            raise BundleError(f"{bundle.path}: mc.dropout_sites: {exc}") from exc
        self.onnx = (
            OnnxPredictor(bundle.onnx_bytes, threads=onnx_threads) if bundle.onnx_bytes else None
        )
        if self.onnx is not None and list(self.onnx.input_shape) != spec.shape:
            raise BundleError(
                f"{bundle.path}/model.onnx: input shape {list(self.onnx.input_shape)} does not "
                f"match the manifest's {spec.shape}"
            )

    def _check_layout(self) -> None:
        m, path = self.manifest, self.bundle.path
        outputs = self.sampler.output_shape
        expected = heads.expected_outputs(m)
        if list(outputs) != [expected]:
            raise BundleError(
                f"{path}: shape mismatch: the model outputs {list(outputs)} per input but the "
                f"manifest declares {expected} output(s)"
            )
        found = [(s.name, s.rule.p, list(s.mask_shape)) for s in self.sampler.graph.sites]
        declared = [(d.name, d.p, d.mask_shape) for d in m.dropout]
        if found != declared:
            raise BundleError(
                f"{path}: dropout layout {found} does not match the manifest's {declared}"
            )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def device(self) -> str:
        return describe(self.sampler.device)

    def sites_for(self, p: PredictParams) -> int | None:
        """The last k dropout sites a request samples, None for every site (also when k is
        the model's count: the same graph and masks). Refuses k outside 1..sites."""
        n = self.sampler.sites
        sites = self.manifest.sampled_sites if p.dropout_sites is None else p.dropout_sites
        if sites == "all" or sites is None:
            return None
        if isinstance(sites, bool) or not 1 <= sites <= n:
            raise InvalidInputError(
                f"dropout_sites must be 'all' or an integer k with 1 <= k <= {n} (the last k of "
                f"the model's {n} dropout sites), got {sites!r}"
            )
        return None if sites == n else sites

    def check_params(self, p: PredictParams) -> None:
        """Refuse parameters that cannot be honoured, before any queueing or compute."""
        if p.mode == "deterministic":
            return
        self.sites_for(p)
        if p.samples < 2:
            raise InvalidInputError(f"samples must be at least 2 for MC dropout, got {p.samples}")
        # A classifier drops the levels its samples cannot reach, with a warning (summarize).
        if p.interval == "quantile" and self.manifest.task == "regression":
            for level in p.confidence:
                need = min_samples_for_quantile(level)
                if p.samples < need:
                    raise InvalidInputError(
                        f"quantile intervals at {level:g} need samples >= {need} "
                        f"(got {p.samples}); ask for more samples or use interval=gaussian"
                    )
        if p.interval == "conformal" and not self.manifest.calibration:
            raise InvalidInputError(
                "interval=conformal needs a calibrated bundle; this one is not calibrated "
                "(use gaussian or quantile)"
            )

    def mc_request(self, x: np.ndarray, p: PredictParams) -> MCRequest:
        seed = p.seed if p.seed is not None else new_seed()
        return MCRequest(x, p.samples, seed, self.sites_for(p))

    def summarize(self, samples: np.ndarray, req: MCRequest, p: PredictParams) -> Prediction:
        """Summaries of one request's samples [T, B, outputs] (``req.x`` is their [B, ...] input:
        the referral reads it for the extrapolation flag)."""
        if req.x.shape[0] != samples.shape[1]:
            raise ValueError(
                f"summarize: {samples.shape[1]} inputs' samples but req.x has {req.x.shape[0]} rows"
            )
        cal = self.calibrator
        warnings: list[str] = []
        if cal.calibrated and req.sites != self.manifest.sampled_sites:
            warnings.append(
                f"dropout_sites={'all' if req.sites is None else req.sites} is not the setting "
                "the model was calibrated with (its default): prediction sets and conformal "
                "intervals assume the default's spread"
            )
        if self.manifest.task == "classification":
            levels = tuple(c for c in p.confidence if p.samples >= min_samples_for_quantile(c))
            dropped = [
                f"{c:g} (needs samples >= {min_samples_for_quantile(c)})"
                for c in p.confidence
                if c not in levels
            ]
            if dropped:
                warnings.append(
                    f"per-class intervals omitted at {', '.join(dropped)}; got samples={p.samples}"
                )
            clf = summarize_classification(samples, levels=levels, temperature=cal.temperature)
            if cal.calibrated:
                sets = cal.prediction_sets(clf.probabilities, p.confidence)
                clf = dataclasses.replace(clf, prediction_sets=sets)
                warnings.extend(cal.warnings(p.samples, p.confidence))
            summary: RegressionSummary | ClassificationSummary = clf
        else:
            try:
                means, noise = heads.split(samples, self.manifest.aleatoric)
            except ValueError as exc:  # an overflowing variance head: this input's answer
                raise InvalidInputError(str(exc)) from exc
            rng = np.random.default_rng([req.seed, 0x6E6F697365])  # seeded noise, replayable
            summary = summarize_regression(
                means,
                levels=p.confidence,
                method="quantile" if p.interval == "quantile" else "gaussian",
                noise_var=noise,
                rng=rng,
            )
            if p.interval == "conformal":
                intervals = cal.intervals(summary, p.confidence)
                summary = dataclasses.replace(summary, intervals=intervals)
                warnings.extend(cal.warnings(p.samples, p.confidence))
        return Prediction(
            backend="torch",
            device=self.device,
            mode="mc",
            samples=p.samples,
            seed=req.seed,
            dropout_sites=req.sites,
            summary=summary,
            warnings=warnings,
            referral=cal.referral(summary, req.x, p.confidence[0]),
        )

    def deterministic(self, x: np.ndarray) -> Prediction:
        """Dropout off on ONNX Runtime (torch eval when the bundle has no graph)."""
        if self.onnx is not None:
            point, backend, device = self.onnx.predict(x), "onnxruntime", self.onnx.device
        else:
            point, backend, device = self.sampler.deterministic(x), "torch", self.device
        if self.manifest.task == "classification":
            point = softmax_rows(point)
        else:  # the means; a variance head's outputs are no prediction
            point = heads.split(point, self.manifest.aleatoric)[0]
        return Prediction(
            backend=backend,
            device=device,
            mode="deterministic",
            samples=None,
            seed=None,
            point=point,
        )

    def predict(self, x: np.ndarray, p: PredictParams) -> Prediction:
        """Synchronous path (CLI, tests): one request, no batching."""
        self.check_params(p)
        if p.mode == "deterministic":
            return self.deterministic(x)
        req = self.mc_request(x, p)
        return self.summarize(self.sampler.run([req])[0], req, p)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
