"""What a bundle's model takes and gives: the manifest's `inputs` and `outputs` sections.

An input is a tensor of a declared shape and dtype, with optional feature names, units and hard
(valid) and soft (training) ranges, or a text (`text`: token ids of the bundle's tokenizer, padded
to a length bucket), or audio (`audio`: WAV files the server turns into log-mel features). An
output is a classifier's labels or a regressor's target(s) and units. `Strict` is the base of
every manifest section: unknown keys are refused, values are frozen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dim = Annotated[int, Field(ge=1)]
Range = tuple[float, float]


def _check_ranges(field: str, ranges: list[Range] | None) -> None:
    """NaN would turn a range check off silently (every comparison with NaN is false)."""
    for i, (lo, hi) in enumerate(ranges or []):
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(
                f"inputs.{field}[{i}] = [{lo}, {hi}] is not a range (NaN or low > high)"
            )
        if lo == math.inf or hi == -math.inf:  # open ends are fine, an empty one is not
            raise ValueError(f"inputs.{field}[{i}] = [{lo}, {hi}] holds no finite value")


class Strict(BaseModel):
    # Infinity and NaN refused in every number (the writer's too): an infinite temperature or
    # noise_var loaded and made every answer a 500 or a flat 0.5. InputSpec's open ranges aside.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WordList(Strict):
    """The training texts' words (`words.txt`, role "words": one per line, sorted), for the
    unfamiliar-text referral (service/engine/familiar.py)."""

    file: str  # the artifact file name
    min_texts: int = Field(ge=1)  # a word is listed when it is in at least this many texts
    count: int = Field(ge=0)  # how many words the file lists


class TextInput(Strict):
    """A text model: instances are strings, tokenized by the bundle's tokenizer.json."""

    tokenizer: str  # the artifact file name (role "tokenizer")
    max_tokens: int = Field(ge=1, le=65536)  # the input's length: ids padded to it
    truncation: Literal["truncate", "error"] = "truncate"  # longer texts: cut, or a 422
    pad_id: int = Field(default=0, ge=0)
    max_text_bytes: int = Field(default=100_000, ge=1)  # refused (413) before tokenization
    # Length buckets (docs/BUNDLES.md): a text runs padded to the smallest bucket that holds its
    # own tokens, never to what shares its batch. Ascending, ending at max_tokens; None (every
    # bundle before buckets): one length, max_tokens. Only for a graph traced length-generic.
    buckets: list[int] | None = Field(default=None, min_length=1, max_length=32)
    words: WordList | None = None  # None: no unfamiliar-text referral (bundles before it)

    @model_validator(mode="after")
    def _buckets(self) -> TextInput:
        b = self.buckets
        if b is not None and (
            b[-1] != self.max_tokens or b[0] < 1 or any(x >= y for x, y in itertools.pairwise(b))
        ):
            raise ValueError(
                f"text.buckets must be ascending lengths ending at max_tokens ({self.max_tokens}), "
                f"got {b}"
            )
        return self

    @property
    def lengths(self) -> tuple[int, ...]:
        """The padded lengths a text can run at (one, max_tokens, without buckets)."""
        return tuple(self.buckets) if self.buckets else (self.max_tokens,)


class AudioInput(Strict):
    """A speech or audio model: instances are WAV files; the server computes the model's log-mel
    features from them (service/engine/audio.py, the same function a trainer calls), so a client
    never has to reproduce the featurisation. Power spectrogram of a periodic Hann window,
    centred frames (reflect-padded), a triangular mel filter bank, then a floored log."""

    sample_rate: int = Field(ge=1000, le=384_000)  # a clip at another rate: see `resample`
    # A clip at another rate: resampled to sample_rate (scipy's resample_poly, engine/
    # resample.py), or refused (422). Off unless the bundle says so: its author knows whether
    # the model tolerates what a resampler does to the signal.
    resample: bool = False
    n_fft: int = Field(ge=8, le=16384)
    win_length: int | None = Field(default=None, ge=2)  # None: n_fft
    hop_length: int = Field(ge=1, le=65536)
    n_mels: int = Field(ge=1, le=512)
    f_min: float = Field(default=0.0, ge=0.0)
    f_max: float | None = Field(default=None, gt=0.0)  # None: sample_rate / 2
    mel_scale: Literal["htk", "slaney"] = "htk"
    norm: Literal["slaney"] | None = None  # "slaney": each filter's area 1 (librosa's default)
    log: Literal["ln", "db"] = "ln"  # ln(max(power, floor)) or 10 log10(max(power, floor))
    floor: float = Field(default=1e-10, gt=0.0)
    frames: int = Field(ge=1, le=100_000)  # the features' time axis: clips are padded or cut
    truncation: Literal["truncate", "error"] = "truncate"  # a longer clip: cut, or a 422
    # A larger file: 413, not decoded. In base64 (/v1, /v2 JSON) a file takes a third more of
    # the request body (setting max_body_bytes, 8 MiB by default): 6 MB fits.
    max_audio_bytes: int = Field(default=6_000_000, ge=64)

    @model_validator(mode="after")
    def _consistent(self) -> AudioInput:
        nyquist = self.sample_rate / 2
        if self.n_fft % 2:  # centred frames pad n_fft // 2 a side: an odd n_fft is a frame short
            raise ValueError(f"audio.n_fft {self.n_fft} must be even (centred frames)")
        if self.window > self.n_fft:
            raise ValueError(f"audio.win_length {self.win_length} is over n_fft {self.n_fft}")
        if self.top > nyquist or self.f_min >= self.top:
            raise ValueError(
                f"audio: f_min {self.f_min} and f_max {self.top} must satisfy 0 <= f_min < f_max "
                f"<= sample_rate / 2 ({nyquist:g})"
            )
        # A clip's frames and its padded samples are held at once, in float64.
        if self.frames * self.n_fft > 1 << 24 or self.samples + self.n_fft > 1 << 24:
            raise ValueError(
                f"audio: {self.frames} frames of n_fft {self.n_fft} and hop {self.hop_length} "
                "are over 2^24 values a clip"
            )
        if self.samples <= self.n_fft // 2:  # the centred frames reflect the clip's ends
            raise ValueError(
                f"audio: {self.frames} frames of hop {self.hop_length} make a clip of "
                f"{self.samples} samples, too short for n_fft {self.n_fft} (more than "
                f"{self.n_fft // 2} needed)"
            )
        return self

    @property
    def window(self) -> int:
        return self.win_length if self.win_length is not None else self.n_fft

    @property
    def top(self) -> float:
        return self.f_max if self.f_max is not None else self.sample_rate / 2

    @property
    def samples(self) -> int:
        """The clip's length in samples: (frames - 1) hops, so centred framing gives `frames`."""
        return (self.frames - 1) * self.hop_length

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


class InputSpec(Strict):
    # Its floats are ranges, which may be open ([0, Infinity]); NaN is refused by _check_ranges.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=True)

    name: str = "input"
    dtype: Literal["float32", "int64"] = "float32"  # int64: token ids for an embedding
    shape: list[Dim] = Field(min_length=0, max_length=8)  # per instance, no batch dimension
    feature_names: list[str] | None = None  # for flat inputs: one per feature
    units: list[str | None] | None = None
    valid_ranges: list[Range] | None = None  # hard: outside -> 422
    training_ranges: list[Range] | None = None  # soft: outside -> flag
    value_range: Range | None = None  # one hard range for every element (images)
    text: TextInput | None = None  # text models: shape [max_tokens], dtype int64
    # audio models: float32 log-mel features of shape [n_mels, frames] (or [1, n_mels, frames])
    audio: AudioInput | None = None

    @model_validator(mode="after")
    def _lengths(self) -> InputSpec:
        _check_ranges("valid_ranges", self.valid_ranges)
        _check_ranges("training_ranges", self.training_ranges)
        _check_ranges("value_range", [self.value_range] if self.value_range else None)
        if self.text is not None and (
            self.dtype != "int64" or self.shape != [self.text.max_tokens]
        ):
            raise ValueError("a text input has dtype int64 and shape [text.max_tokens]")
        a = self.audio
        if a is not None and (
            self.text is not None
            or self.dtype != "float32"
            or self.shape not in ([a.n_mels, a.frames], [1, a.n_mels, a.frames])
        ):
            raise ValueError(
                "an audio input has dtype float32 and shape [audio.n_mels, audio.frames] (or "
                f"[1, n_mels, frames]), and no text; got {self.dtype} {self.shape}"
            )
        n = 1
        for d in self.shape:
            n *= d
        for field in ("feature_names", "units", "valid_ranges", "training_ranges"):
            v = getattr(self, field)
            if v is not None and len(v) != n:
                raise ValueError(f"inputs.{field} has {len(v)} entries for {n} features")
        # They key a /v1 instance given as an object: a name twice filled both features.
        distinct("inputs.feature_names", self.feature_names, "each feature needs its own name")
        return self

    @property
    def features(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TargetSpec(Strict):
    """One target of a multi-output regressor."""

    name: str = Field(min_length=1, max_length=64)
    unit: str | None = None


class OutputSpec(Strict):
    name: str = "output"
    labels: list[str] | None = None  # classification
    target: str | None = None  # regression, one target
    unit: str | None = None
    description: str | None = None
    # Regression with k >= 2 targets, in the model's output order (instead of target/unit).
    targets: list[TargetSpec] | None = None

    @model_validator(mode="after")
    def _distinct_labels(self) -> OutputSpec:
        # They key the probabilities in /v1 answers: a label twice dropped a class's there.
        distinct("outputs.labels", self.labels, "each class needs its own label")
        return self

    @property
    def target_names(self) -> list[str]:
        """The regression targets in output order (one name for a single-target model)."""
        if self.targets:
            return [t.name for t in self.targets]
        return [self.target] if self.target else []


def distinct(field: str, values: Sequence[str] | None, why: str) -> None:
    """ValueError naming the first value given twice."""
    seen: set[str] = set()
    for v in values or []:
        if v in seen:
            raise ValueError(f"{field} lists {v[:40]!r} twice; {why}")
        seen.add(v)
