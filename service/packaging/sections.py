"""The manifest sections `save` builds from its arguments, and its one-line refusals.

Split from writer.py (which stays the order of the work); each returns a section or raises a
ModelError the writer's user can act on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from service.bundle.manifest import Aleatoric, Variance
from service.bundle.spec import AudioInput, OutputSpec, TargetSpec
from service.bundle.vocabulary import check_vocabulary, embedding_rows
from service.bundle.weights import check_finite
from service.engine.audio import empty_filters, silence
from service.errors import BundleError, ModelError
from service.packaging.randomness import kept_modes


@contextmanager
def manifest_errors() -> Iterator[None]:
    """A manifest section pydantic refuses, as one line (not a validation traceback)."""
    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ModelError(
            f"the bundle's manifest would be invalid at '{loc}': {first['msg']}"
        ) from None


def vocabulary(gm: torch.fx.GraphModule) -> int:
    """The smallest vocabulary among the embeddings that read the input ids directly."""
    rows = embedding_rows(gm)
    if rows is None:
        raise ModelError("an integer example_input must be read by an nn.Embedding (token ids)")
    return rows[1]


def check_token_example(module: nn.Module, dtype: torch.dtype, text: bool) -> None:
    """An integer example is token ids: refused unless an nn.Embedding is there to read them.
    uint8 pixels were cast to ids and failed in the first convolution, "Input type (long int)",
    as if the shape were wrong (review IM). `text`: a tokenizer was given."""
    if any(isinstance(m, nn.Embedding) for m in module.modules()):
        return
    if text:
        raise ModelError("a text model's token ids must be read by an nn.Embedding; it has none")
    raise ModelError(
        f"an integer example_input ({dtype}) is read as token ids, which an nn.Embedding "
        "reads, and this model has none: pass pixels or measurements as a float example, "
        "scaled as the model was trained (e.g. x.float() / 255), and declare that scale "
        "with value_range"
    )


def check_weights(state: dict[str, torch.Tensor], parameters: Collection[str]) -> None:
    """A weight that is not finite, refused before writing (the loader refuses it too)."""
    try:
        check_finite(state, "the module's weights", parameters)
    except BundleError as exc:  # the module given to save is the cause
        raise ModelError(exc.message) from None


def check_ids(
    rebuilt: nn.Module, value_range: tuple[float, float] | None, tokenizer: Any, pad_id: int | None
) -> None:
    """An id the tokenizer makes, or value_range allows, that the embedding has no row for,
    refused before writing (the loader refuses it too)."""
    try:
        check_vocabulary(rebuilt, value_range, tokenizer, pad_id, "save")
    except BundleError as exc:  # the model or tokenizer given to save is the cause
        raise ModelError(exc.message) from None


def aleatoric(noise_var: float | None, variance: Variance | None) -> Aleatoric:
    if variance is not None:
        return Aleatoric(kind="heteroscedastic", parameterisation=variance)
    if noise_var:
        return Aleatoric(kind="homoscedastic", noise_var=noise_var)
    return Aleatoric()


def outputs_of(names: list[str], units: str | Sequence[str | None] | None) -> OutputSpec:
    if len(names) == 1:
        if units is not None and not isinstance(units, str):
            raise ModelError("target_unit is one unit (a string) for a single target")
        return OutputSpec(target=names[0], unit=units)
    unit_list = [None] * len(names) if units is None else units
    if isinstance(unit_list, str) or len(unit_list) != len(names):
        raise ModelError(f"target_unit must list one unit (or None) per target: {len(names)}")
    if len(set(names)) != len(names):
        raise ModelError(f"target names must be distinct, got {names}")
    return OutputSpec(
        targets=[TargetSpec(name=n, unit=u) for n, u in zip(names, unit_list, strict=True)]
    )


# A classifier's last operation that is already a softmax: the server's own softmax (with its
# temperature) then made softmax(softmax(z)), [1, 0, 0] served as [0.58, 0.21, 0.21] (review
# IM). log_softmax is harmless: softmax(log_softmax(z)) is softmax(z).
_SOFTMAX_MODULES = (nn.Softmax,)
_SOFTMAX_FUNCTIONS = (torch.softmax, torch.nn.functional.softmax)
ONE_LOGIT = (
    "a one-logit binary classifier (sigmoid, BCEWithLogitsLoss) can return "
    "torch.cat([torch.zeros_like(z), z], -1) with labels=[negative, positive]: the softmax of "
    "that is sigmoid(z)"
)


def check_classifier(
    gm: torch.fx.GraphModule, example: torch.Tensor, labels: Sequence[str] | None, width: int
) -> None:
    """A classifier's outputs are one logit per label, at least two, and not probabilities."""
    if width < 2:
        raise ModelError(
            f"a classifier outputs a logit per class, at least 2, not {width}; {ONE_LOGIT}"
        )
    if not labels or len(labels) != width:
        given = len(labels) if labels else 0
        raise ModelError(f"labels must name each of the {width} output logits (got {given})")
    fix = (
        "return the logits: the server applies the softmax itself (with the calibrated temperature)"
    )
    (last,) = [n for n in gm.graph.nodes if n.op == "output"]
    out = last.args[0]
    if isinstance(out, torch.fx.Node) and (
        (
            out.op == "call_module"
            and isinstance(gm.get_submodule(str(out.target)), _SOFTMAX_MODULES)
        )
        or (out.op == "call_function" and out.target in _SOFTMAX_FUNCTIONS)
        or (out.op == "call_method" and out.target == "softmax")
    ):
        raise ModelError(f"the model ends in a softmax ('{out.name}'): {fix}")
    with kept_modes(gm), torch.inference_mode():
        z = gm.eval()(example)
    probabilities = isinstance(z, torch.Tensor) and z.numel() > 0 and bool((z >= 0).all())
    sums = z.sum(-1) if probabilities else None
    if sums is not None and torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        raise ModelError(
            "the model's outputs on the example are probabilities (non-negative, each row "
            f"summing to 1), not logits: {fix}"
        )


def check_audio(
    audio: AudioInput | dict[str, Any] | None,
    tokenizer: Any,
    truncation: str | None,
    example: torch.Tensor,
    value_range: tuple[float, float] | None,
) -> AudioInput | None:
    """An audio front end the server can compute (writer.save's `audio`, an AudioInput or its
    fields), whose example features and silence its own value_range holds."""
    if audio is None:
        return None
    if isinstance(audio, dict):  # an lru_cache of the filter bank hashes it: "unhashable dict"
        try:
            audio = AudioInput(**audio)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(k) for k in first["loc"])
            raise ModelError(f"audio{'.' + field if field else ''}: {first['msg']}") from None
    if not isinstance(audio, AudioInput):
        raise ModelError(f"audio= takes an AudioInput or its fields, got {type(audio).__name__}")
    if tokenizer is not None:
        raise ModelError("audio= and tokenizer= declare two kinds of input: a model reads one")
    if truncation is not None:  # save's truncation= is the text policy
        raise ModelError(
            "truncation= is a text model's; an audio model's is AudioInput(truncation=...)"
        )
    if empty_filters(audio):
        raise ModelError(
            f"audio: mel filter(s) {empty_filters(audio)[:5]} hold no FFT bin (n_mels "
            f"{audio.n_mels} is too many for n_fft {audio.n_fft}): fewer mels or a larger n_fft"
        )
    if value_range is not None:  # else every clip like these would be refused (422) once served
        lo, hi = value_range
        low, high = float(example.min()), float(example.max())
        if not (lo <= low and high <= hi):  # NaN fails too
            raise ModelError(
                f"the example features run from {low:.4g} to {high:.4g}, outside value_range "
                f"{list(value_range)}: every clip like them would be refused (are the training "
                "features clip_features of the WAV files, or log_mel of float samples in [-1, 1]?)"
            )
        # Silence's feature as the server makes it (float32: ln 1e-8 is -18.42068099975586,
        # under the float64 -18.420680743952367 a range ending there would hold).
        floor = silence(audio)
        if not lo <= floor <= hi:  # a clip shorter than the model's is padded with silence
            raise ModelError(
                f"value_range {list(value_range)} does not hold the features of silence, "
                f"{floor!r} ({audio.log} of the floor {audio.floor:g}): every clip shorter than "
                f"the model's {audio.seconds:g} s, or with a silent band, would be refused; "
                f"widen it to hold {floor!r}"
            )
    return audio
