"""A served model: a verified bundle with its MC sampler and its deterministic predictor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from service.bundle.load import LoadedBundle
from service.bundle.manifest import Manifest
from service.engine import familiar, heads
from service.engine.audio import empty_filters
from service.engine.buckets import Buckets
from service.engine.budgets import TOKEN_BUDGET
from service.engine.calibrator import Calibrator
from service.engine.cancels import Flag
from service.engine.device import describe
from service.engine.onnx_predictor import checked_predictor, probe_input
from service.engine.params import PredictParams, new_seed
from service.engine.prediction import Prediction
from service.engine.regression import summarize_regression
from service.engine.sampler import MCRequest, MCSampler
from service.engine.summaries import (
    ClassificationSummary,
    RegressionSummary,
    SummaryError,
    level_text,
    min_samples_for_quantile,
    softmax,
)
from service.errors import BundleError, InvalidInputError, ModelError


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
            self.calibrator = Calibrator(self.manifest, overrides, familiar.for_bundle(bundle))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise BundleError(
                f"{bundle.path}: the referral override for '{self.manifest.name}' is invalid "
                f"(setting referral): {exc}"
            ) from exc
        spec = self.manifest.inputs
        if spec.audio is not None and empty_filters(spec.audio):  # as the writer refuses it
            raise BundleError(f"{bundle.path}: inputs.audio: n_mels too many for n_fft")
        # Checked against the module (still on the CPU, as loaded) before the sampler moves it.
        self.onnx = checked_predictor(bundle, onnx_threads) if bundle.onnx_bytes else None
        # Inputs within the manifest's ranges, not zeros: an all-padding text made a model that
        # indexes its last token fail to load (index -1).
        example = torch.as_tensor(probe_input(spec, 2))
        try:
            self.sampler = MCSampler(
                bundle.module,
                example,
                device=device,
                row_budget=row_budget,
                fused=None if fused_masks else False,  # None: wherever the kernel applies
                # Forwards sized in tokens for text only (integer tabular codes are not tokens).
                token_budget=TOKEN_BUDGET if spec.text is not None else None,
            )
        except RuntimeError as exc:
            raise BundleError(
                f"{bundle.path}: the model does not accept inputs of shape {spec.shape}: {exc}"
            ) from exc
        self._check_layout()
        text = spec.text
        self.buckets = Buckets(text.lengths, text.pad_id) if text and text.buckets else None
        self.samplers = {spec.shape[0]: self.sampler} if text else {}
        if self.buckets is not None:
            self._bucket_samplers(row_budget, device, fused_masks)
        try:  # the default dropout-site setting's split, built now: errors at load, not later
            for sampler in [
                self.sampler,
                *(s for s in self.samplers.values() if s is not self.sampler),
            ]:
                sampler.pin(self.manifest.sampled_sites)
        except InvalidInputError as exc:
            raise BundleError(f"{bundle.path}: mc.dropout_sites: {exc}") from exc

    def _bucket_samplers(
        self, row_budget: int, device: torch.device | str | None, fused_masks: bool
    ) -> None:
        """A text model with length buckets: one sampler per bucket length, the same weights
        (service/engine/buckets.py). On the CPU each sampler sizes its forwards in tokens
        (budgets.TOKEN_BUDGET), so a shorter bucket runs more rows per forward; on CUDA every
        forward is padded to the row budget (sampler.py)."""
        assert self.buckets is not None
        for n in (int(b) for b in self.buckets.lengths[:-1]):
            try:
                self.samplers[n] = MCSampler(
                    self.bundle.module,
                    torch.as_tensor(probe_input(self.manifest.inputs, 2)[:, :n]),
                    device=device,
                    row_budget=row_budget,
                    fused=None if fused_masks else False,
                )
            except (RuntimeError, ModelError) as exc:
                raise BundleError(
                    f"{self.bundle.path}: the model does not serve its bucket length {n} "
                    f"(inputs.text.buckets): {exc}"
                ) from exc
            self.samplers[n].stats = self.sampler.stats  # one set of counters per model

    def _check_layout(self) -> None:
        m, path = self.manifest, self.bundle.path
        outputs = self.sampler.output_shape
        expected = heads.expected_outputs(m)
        if list(outputs) != [expected]:
            raise BundleError(
                f"{path}: shape mismatch: the model outputs {list(outputs)} per input but the "
                f"manifest declares {expected} output(s)"
            )
        # shared_over too: the graph's VariationalDropout sites and the manifest must agree.
        sites = self.sampler.graph.sites
        found = [(s.name, s.rule.p, list(s.mask_shape), s.shared_over) for s in sites]
        declared = [(d.name, d.p, d.mask_shape, d.shared_over) for d in m.dropout]
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
                        f"quantile intervals at {level_text(level)} need samples >= {need} "
                        f"(got {p.samples}); ask for more samples or use interval=gaussian"
                    )
        if p.interval == "conformal" and not self.manifest.calibration:
            raise InvalidInputError(
                "interval=conformal needs a calibrated bundle; this one is not calibrated "
                "(use gaussian or quantile)"
            )

    def mc_request(
        self,
        x: np.ndarray,
        p: PredictParams,
        deadline: float | None = None,
        cancel: Flag | None = None,
    ) -> MCRequest:
        seed = p.seed if p.seed is not None else new_seed()
        sites = self.sites_for(p)
        return MCRequest(x, p.samples, seed, sites=sites, deadline=deadline, cancel=cancel)

    def sample(self, reqs: list[MCRequest]) -> list[np.ndarray]:
        """Samples [T, B, *output] per request, each text at its own length bucket."""
        if self.buckets is None:
            return self.sampler.run(reqs)
        for r in reqs:  # the declared shape and passes, before any cutting to buckets
            self.sampler._check(r)
        return self.buckets.run(self.samplers, reqs)

    @property
    def cost_unit(self) -> int:
        """What one row at full size costs in `cost` (max_tokens for a bucketed text model)."""
        return self.buckets.max_tokens if self.buckets is not None else 1

    @property
    def least_cost(self) -> int:
        """What one row costs in `cost` at the least: the shortest bucket of a bucketed text
        model (its tokens), else 1."""
        return int(self.buckets.lengths[0]) if self.buckets is not None else 1

    def cost(self, x: np.ndarray, passes: int) -> int:
        """The work of `passes` over inputs x in `cost_unit`s: rows, or for a bucketed text
        model tokens (rows x bucket length), so short texts count for less."""
        if self.buckets is None:
            return passes * int(x.shape[0])
        return passes * self.buckets.tokens(x)

    def length_class(self, x: np.ndarray) -> int:
        """The longest bucket the inputs need (0 without buckets): the batcher's queue."""
        return int(self.buckets.of(x).max()) if self.buckets is not None and len(x) else 0

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
                f"{level_text(c)} (needs samples >= {min_samples_for_quantile(c)})"
                for c in p.confidence
                if c not in levels
            ]
            if dropped:
                warnings.append(
                    f"per-class intervals omitted at {', '.join(dropped)}; got samples={p.samples}"
                )
            clf = cal.classify(samples, levels)
            if cal.calibrated:
                sets = cal.prediction_sets(clf.probabilities, p.confidence)
                clf = dataclasses.replace(clf, prediction_sets=sets)
                warnings.extend(cal.warnings(p.samples, p.confidence))
            summary: RegressionSummary | ClassificationSummary = clf
        else:
            means, noise = heads.split(samples, self.manifest.aleatoric)
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
            referral=cal.referral(summary, req.x),
        )

    def deterministic(self, x: np.ndarray) -> Prediction:
        """Dropout off on ONNX Runtime (torch eval when the bundle has no graph)."""
        run: Callable[[np.ndarray], np.ndarray]
        if self.onnx is not None and (self.buckets is None or self.onnx.dynamic_length):
            run, backend, device = self.onnx.predict, "onnxruntime", self.onnx.device
            if self.manifest.inputs.text is not None:
                run = _one_at_a_time(run)
        else:  # batched: torch pads each call to a fixed row count, one text a call is 100x
            run, backend, device = self._torch_point, "torch", self.device
        point = run(x) if self.buckets is None else self.buckets.each(x, run)
        if not np.isfinite(point).all():  # as the MC summary says: not null probabilities
            what = "logits" if self.manifest.task == "classification" else "outputs"
            raise SummaryError(
                f"{what} contain NaN or infinite values; the model output is unusable"
            )
        if self.manifest.task == "classification":
            # Through the bundle's calibration, like the MC answer: vector scaling moves labels
            # (medical-abstracts test accuracy 0.544 raw, 0.576 calibrated). It was fitted to
            # the MC average, so for one pass it is a correction, not a guarantee.
            point = softmax(self.calibrator.logits(point), axis=-1)
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

    def _torch_point(self, x: np.ndarray) -> np.ndarray:
        return self.samplers.get(int(x.shape[-1]), self.sampler).deterministic(x)

    def predict(self, x: np.ndarray, p: PredictParams) -> Prediction:
        """Synchronous path (CLI, tests): one request, no batching."""
        self.check_params(p)
        if p.mode == "deterministic":
            return self.deterministic(x)
        req = self.mc_request(x, p)
        return self.summarize(self.sample([req])[0], req, p)


def _one_at_a_time(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """`run` over one input at a time. A text's deterministic answer then never depends on what
    shares its request: ONNX Runtime's convolutions round differently by batch size (up to 5e-8
    on medical-abstracts). Free for text on ONNX Runtime: 64 abstracts took 19.4 ms one by one,
    19.0 ms together. Not for the torch fallback, which pads every call to `min_rows` (64 on the
    CPU): 11.7 s against 0.11 s; its answers may differ in the last bits by company (~1e-7)."""

    def each(x: np.ndarray) -> np.ndarray:
        if x.shape[0] < 2:
            return run(x)
        return np.concatenate([run(x[i : i + 1]) for i in range(x.shape[0])])

    return each
