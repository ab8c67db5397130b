"""The output tensors of /v2: every uncertainty summary of the engine as a named tensor.

Shapes are batch-first: `[B, *shape]`. Float outputs are FP64, the engine's own precision, so
/v1 and /v2 give the same numbers bit for bit. `label` is the INT64 class index (the class names
are the model's `outputs.labels`, listed by GET /v1/models/{name}); an index reads directly with
tritonclient's `as_numpy`.

A classifier's `lower` and `upper` are its per-class intervals ([B, K], as /v1's `intervals`;
NaN, JSON null, where too few passes reach the level). `prediction_set` (BOOL [B, K],
conformal, at the request's confidence) exists for calibrated
classifiers only; `refer` (BOOL [B]: a human should look) for every model, since each has a
referral policy (its bundle's, or the default one at its confidence level). Both are MC outputs.
`passes_used` (INT64 [B]) is the passes each input's answer used: the request's `samples`, or
for samples=auto the passes its chunks reached (a response that names no outputs carries it only
then). A text model adds `tokens` (INT64 [B]: each text's tokens before any cut) and
`truncated` (BOOL [B]: whether it was cut), an audio model `seconds` (FP64 [B]: each file's
length), `truncated` and `sample_rate` (INT64 [B]: its own rate, resampled if not the model's),
in both modes: the protocol's response parameters hold only scalars, and these are per input.
To add an output: add its `TensorSpec` in `specs` under the condition that makes it exist, and
say in `values` where the engine's `Prediction` holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.model import Prediction, ServedModel
from service.engine.prediction import inputs
from service.engine.summaries import ClassificationSummary, RegressionSummary

PLATFORM = "pytorch_mc_dropout"
NUMPY = {"INT64": np.int64, "BOOL": np.bool_, "FP64": np.float64}
CLASS_SCORES = ("predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio")
PASSES_USED = "passes_used"
TEXT_NOTES = {"tokens": "INT64", "truncated": "BOOL"}  # per text, from the tokenizer
# Per WAV file; sample_rate came last (2026-12-07): a client may read outputs by position.
AUDIO_NOTES = {"seconds": "FP64", "truncated": "BOOL", "sample_rate": "INT64"}
NOTES = {**TEXT_NOTES, **AUDIO_NOTES}  # the outputs read from a prediction's input_notes
REGRESSION = ("std", "epistemic_std", "aleatoric_std", "lower", "upper", "mc_standard_error")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # FP64 | INT64 | BOOL
    shape: tuple[int, ...]  # per instance, without the batch dimension
    deterministic: bool = False  # also answered by mode=deterministic (dropout off)

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


def specs(model: ServedModel) -> list[TensorSpec]:
    """Every output the model can answer, in the order of a response that names none."""
    labels = model.manifest.outputs.labels
    if labels:
        k = (len(labels),)
        out = [
            TensorSpec("probabilities", "FP64", k, deterministic=True),
            TensorSpec("probability_std", "FP64", k),
            TensorSpec("label", "INT64", (), deterministic=True),
            *(TensorSpec(n, "FP64", ()) for n in CLASS_SCORES),
            # After the older ones (a client may read them by position): per-class quantiles
            # of p at the request's confidence, NaN (JSON null) where the passes cannot reach
            # the level (the answer's warning says so).
            TensorSpec("probability_se", "FP64", k),
            TensorSpec("lower", "FP64", k),
            TensorSpec("upper", "FP64", k),
        ]
        if model.calibrator.calibrated:
            out.append(TensorSpec("prediction_set", "BOOL", k))
    else:
        d = (len(model.manifest.outputs.target_names),)  # the target axis
        out = [
            TensorSpec("mean", "FP64", d, deterministic=True),
            *(TensorSpec(n, "FP64", d) for n in REGRESSION),
        ]
    out += [TensorSpec("refer", "BOOL", ()), TensorSpec(PASSES_USED, "INT64", ())]
    spec = model.manifest.inputs
    notes = TEXT_NOTES if spec.text is not None else AUDIO_NOTES if spec.audio is not None else {}
    out += [TensorSpec(n, t, (), deterministic=True) for n, t in notes.items()]
    return out


def values(pred: Prediction, wanted: list[TensorSpec]) -> list[np.ndarray]:
    """The arrays of the `wanted` outputs (already checked against `specs` and the mode)."""
    s = pred.summary
    out = []
    for spec in wanted:
        arr: object
        if spec.name in NOTES:
            notes = pred.input_notes or []
            arr = np.array([n[spec.name] for n in notes], dtype=NUMPY[spec.datatype])
        elif pred.point is not None and spec.name == "label":
            # Dropout off: the class of the largest probability, as /v1's deterministic answer.
            arr = np.argmax(pred.point, axis=1).astype(np.int64)
        elif pred.point is not None:
            # Deterministic mode's one summary: the mean or the probabilities.
            arr = np.asarray(pred.point, dtype=np.float64)
        elif not isinstance(s, RegressionSummary | ClassificationSummary):
            raise AssertionError(f"an MC prediction without a summary: {type(s)}")
        elif spec.name in ("lower", "upper") and not s.intervals:  # omitted: too few passes
            arr = np.full((inputs(pred), *spec.shape), np.nan)
        elif spec.name in ("lower", "upper"):
            # One confidence level per /v2 request: the first (only) interval and prediction set.
            arr = getattr(s.intervals[0], spec.name)
        elif spec.name == "prediction_set":
            assert isinstance(s, ClassificationSummary)
            arr = s.prediction_sets[0].members
        elif spec.name == PASSES_USED:
            arr = np.full(inputs(pred), pred.samples or 0, dtype=np.int64)
        elif spec.name == "refer":
            assert pred.referral is not None
            arr = pred.referral.refer
        else:
            arr = getattr(s, spec.name)
        out.append(np.asarray(arr))
    return out
