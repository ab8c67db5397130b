"""Audio clips to an audio model's log-mel features, or a message that says what is wrong.

The server computes the features itself, from the manifest's `inputs.audio` (spec.AudioInput),
so a client sends a WAV file and never has to reproduce a featurisation. A trainer computes its
training features with the same function, `log_mel`, so what the model is served is what it
learnt from. Conventions are torchaudio's `MelSpectrogram` (checked against torch.stft and
librosa's filter banks in tests/engine/test_audio.py): a periodic Hann window centred in n_fft,
centred frames with the clip reflected at its ends, the power spectrum, triangular mel filters
(HTK or Slaney scale, optionally Slaney area-normalised), then ln or dB of max(power, floor).

Every clip is padded with silence or cut to the model's fixed length (`frames`), so a clip's
features never depend on what shares its batch; a longer clip is cut (reported per clip, as
`truncated`) or refused (truncation "error"). Arithmetic in float64, the features float32.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.bundle.spec import AudioInput
from service.engine.resample import MAX_FACTOR, RATES, factors, needed, resample
from service.engine.wav import Clip, read_wav
from service.errors import InvalidInputError, PayloadTooLargeError


@dataclasses.dataclass(frozen=True)
class AudioBatch:
    """Features [B, n_mels, frames] float32 (not yet range-checked), and per clip its length in
    seconds and whether it was cut."""

    x: np.ndarray
    seconds: list[float]
    truncated: list[bool]
    rates: list[int]  # each clip's own sample rate (resampled where it is not the model's)

    def notes(self) -> list[dict[str, Any]]:
        """Per clip, what a prediction reports of its reading."""
        return [
            {"seconds": s, "truncated": cut, "sample_rate": r}
            for s, r, cut in zip(self.seconds, self.rates, self.truncated, strict=True)
        ]


def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: linear to 1 kHz, logarithmic above (librosa's and torchaudio's "slaney").
    lin = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / _STEP, lin)


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return np.where(m >= 15.0, 1000.0 * np.exp(_STEP * (m - 15.0)), m * (200.0 / 3))


_STEP = np.log(6.4) / 27.0  # Slaney's log step above 1 kHz


@functools.lru_cache(maxsize=32)
def filter_bank(a: AudioInput) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float64: triangles between mel-spaced edges from f_min to f_max,
    over the FFT's bin frequencies 0 .. sample_rate / 2. Read-only (it is cached)."""
    freqs = np.linspace(0.0, a.sample_rate / 2, a.n_fft // 2 + 1)
    ends = _hz_to_mel(np.array([a.f_min, a.top]), a.mel_scale)
    edges = _mel_to_hz(
        np.linspace(ends[0], ends[1], a.n_mels + 2),
        a.mel_scale,
    )
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]  # [bins, n_mels + 2]
    with np.errstate(divide="ignore", invalid="ignore"):  # widths of 0: empty_filters says so
        down = -slopes[:, :-2] / widths[:-1]
        up = slopes[:, 2:] / widths[1:]
        bank = np.maximum(0.0, np.minimum(down, up)).T
        if a.norm == "slaney":
            bank *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    bank.setflags(write=False)
    return bank


def empty_filters(a: AudioInput) -> list[int]:
    """The mel filters no FFT bin falls in (too many mels for n_fft: they would be constant),
    or that are not finite (an f_max of 1e-300 divided by widths of 0)."""
    return [int(i) for i in np.flatnonzero(~(filter_bank(a).max(axis=1) > 0.0))]


def silence(a: AudioInput) -> float:
    """The feature silence has, as log_mel computes it (the floored log, in float32)."""
    v = np.log(a.floor) if a.log == "ln" else 10.0 * np.log10(a.floor)
    return float(np.float32(v))


@functools.lru_cache(maxsize=32)
def _window(a: AudioInput) -> np.ndarray:
    """A periodic Hann window of win_length, centred in n_fft (zeros either side)."""
    n = a.window
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    out = np.zeros(a.n_fft)
    left = (a.n_fft - n) // 2
    out[left : left + n] = hann
    out.setflags(write=False)
    return out


def fit(samples: np.ndarray, a: AudioInput) -> tuple[np.ndarray, bool]:
    """The clip padded with silence or cut to the model's length; and whether it was cut."""
    n = a.samples
    if samples.shape[0] >= n:
        return samples[:n], samples.shape[0] > n
    return np.concatenate([samples, np.zeros(n - samples.shape[0])]), False


# How the server scales a WAV file's integer samples, by numpy type (wav.py).
_SCALES = {"i2": "divide by 2**15", "i4": "divide by 2**31", "u1": "(x - 128) / 128"}


def log_mel(samples: np.ndarray, a: AudioInput) -> np.ndarray:
    """[n_mels, frames] float32 features of a mono clip (float samples, nominally in [-1, 1],
    at a.sample_rate), padded or cut to the model's length first. Train on these, or on
    `clip_features` of the WAV files' bytes (the server's whole path)."""
    arr = np.asarray(samples)
    if arr.ndim != 1:  # soundfile's [n, channels] was read interleaved: 55 dB off
        raise ValueError(
            f"log_mel takes a mono clip of shape [samples], got {arr.shape}: average over the "
            "channel axis, as the server does (axis=1 for soundfile's [samples, channels], "
            "axis=0 for torchaudio's [channels, samples])"
        )
    if arr.dtype.kind in "iub":  # scipy's int16 samples: 90 dB above the served features
        scale = _SCALES.get(
            arr.dtype.str.lstrip("<>|="),
            "divide by the full scale of the bit depth they were recorded at, 2**15 for 16 bits",
        )
        raise ValueError(
            f"log_mel takes float samples in [-1, 1], got {arr.dtype}: scale them as the server "
            f"does ({scale}), or use clip_features on the WAV file's bytes"
        )
    x, _ = fit(arr.astype(np.float64), a)
    half = a.n_fft // 2
    padded = np.pad(x, half, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, a.n_fft)[:: a.hop_length]
    spectrum = np.fft.rfft(frames * _window(a), axis=1)
    power = spectrum.real**2 + spectrum.imag**2  # [frames, bins]
    mel = filter_bank(a) @ power.T  # [n_mels, frames]
    floored = np.maximum(mel, a.floor)
    out = np.log(floored) if a.log == "ln" else 10.0 * np.log10(floored)
    return out.astype(np.float32)


def clip_features(wav: bytes, a: AudioInput) -> np.ndarray:
    """[n_mels, frames] features of a WAV file's bytes, exactly as the server computes them
    (its rate checked, channels averaged, integers scaled): the way to make training features."""
    return encode_audio([wav], a, "the clip").x[0]


_SPACE = re.compile(r"\s")


def from_base64(text: str, a: AudioInput, where: str) -> bytes:
    """A base64 clip's bytes; its size is checked before it is decoded."""
    bad = InvalidInputError(
        f"{where}: the audio is not valid base64 (standard alphabet, '=' padding, no line breaks)"
    )
    if _SPACE.search(text):
        raise bad  # what the decoder refuses too; its size below would count the spaces
    size = len(text.rstrip("=")) * 3 // 4  # what it decodes to, if it is base64
    if size > a.max_audio_bytes:
        raise _too_large(where, size, a)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad from None


def _too_large(where: str, size: int, a: AudioInput) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{where}: the audio is {size} bytes, over this model's limit of {a.max_audio_bytes} "
        f"(a {a.seconds:g} s clip at {a.sample_rate} Hz needs far less): cut it or split it"
    )


def clip_bytes(clip: bytes | str, a: AudioInput, where: str) -> bytes:
    """A clip's WAV bytes (out of its base64 if text), within the model's size limit."""
    data = from_base64(clip, a, where) if isinstance(clip, str) else clip
    if len(data) > a.max_audio_bytes:
        raise _too_large(where, len(data), a)
    return data


def encode_audio(clips: Sequence[bytes | str], a: AudioInput, item: str = "instance") -> AudioBatch:
    """Features of WAV files (bytes, or base64 text). Each refusal names the clip as `item` and
    its index."""
    xs, seconds, cuts, rates = [], [], [], []
    for i, clip in enumerate(clips):
        where = f"{item} {i}"
        data = clip_bytes(clip, a, where)
        # Only what the model's clip reads is decoded (+1 output: cut or not).
        wav = read_wav(data, where, a.sample_rate, max_frames=lambda r: _needed(r, a))
        samples, n = _at_model_rate(wav, a, where)
        xs.append(log_mel(samples, a))
        seconds.append(wav.frames / wav.sample_rate)
        cuts.append(n > a.samples)
        rates.append(wav.sample_rate)
    return AudioBatch(np.stack(xs), seconds, cuts, rates)


def _needed(rate: int, a: AudioInput) -> int:
    """Frames of a file at `rate` that the model's clip (and one sample more) is made from."""
    f = factors(rate, a.sample_rate) if rate != a.sample_rate and a.resample else None
    return needed(a.samples + 1, *f) if f is not None else a.samples + 1


def _at_model_rate(wav: Clip, a: AudioInput, where: str) -> tuple[np.ndarray, int]:
    """The clip's samples at the model's rate (resampled if it allows, else refused), and the
    whole file's length in samples at that rate; a clip too long for truncation "error" is
    refused before it is filtered."""
    rate = wav.sample_rate
    f = factors(rate, a.sample_rate) if a.resample and rate != a.sample_rate else None
    if rate != a.sample_rate and f is None:
        if not a.resample:
            why = "this model does not resample"
        elif not RATES[0] <= rate <= RATES[1]:
            why = f"the server resamples files of {RATES[0]} to {RATES[1]} Hz"
        else:
            why = (
                f"the server resamples only between rates whose ratio reduces to terms of at "
                f"most {MAX_FACTOR} ({a.sample_rate}:{rate} does not)"
            )
        raise InvalidInputError(
            f"{where}: the clip is sampled at {rate} Hz; this model reads {a.sample_rate} Hz: "
            f"resample it (e.g. ffmpeg -i IN -ar {a.sample_rate} -ac 1 OUT.wav); {why}"
        )
    n = wav.frames if f is None else -(-wav.frames * f[0] // f[1])
    if n > a.samples and a.truncation == "error":
        raise InvalidInputError(
            f"{where}: the clip is {wav.frames / rate:g} s, over this model's {a.seconds:g} s "
            "(truncation policy 'error'): cut it"
        )
    return (wav.samples if f is None else resample(wav.samples, *f, a.samples + 1)), n
