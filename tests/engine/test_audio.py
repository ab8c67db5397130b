"""An audio model's features computed by the server from WAV files (service/engine/audio.py):
the spectrogram against torch.stft, the mel filters against librosa's, the manifest's audio
section checked, and what a clip can be refused for."""

from __future__ import annotations

import base64
import re

import librosa
import numpy as np
import pytest
import torch
from audio_nets import tone, wav
from pydantic import ValidationError

from service.bundle.spec import AudioInput, InputSpec
from service.engine.audio import (
    clip_features,
    empty_filters,
    encode_audio,
    filter_bank,
    fit,
    log_mel,
)
from service.engine.clips import audio_batch
from service.errors import InvalidInputError, PayloadTooLargeError

A = AudioInput(sample_rate=16000, n_fft=400, win_length=320, hop_length=160, n_mels=40, frames=101)


BANKS = [("htk", None), ("slaney", "slaney"), ("htk", "slaney"), ("slaney", None)]


@pytest.mark.parametrize(("scale", "norm"), BANKS)
def test_filter_banks_are_librosas(scale: str, norm: str | None) -> None:
    a = AudioInput(sample_rate=22050, n_fft=512, hop_length=128, n_mels=64, frames=50,
                   f_min=30.0, f_max=8000.0, mel_scale=scale, norm=norm)  # type: ignore[arg-type]  # fmt: skip
    want = librosa.filters.mel(
        sr=22050, n_fft=512, n_mels=64, fmin=30.0, fmax=8000.0, htk=scale == "htk", norm=norm,
        dtype=np.float64,
    )  # fmt: skip
    np.testing.assert_allclose(filter_bank(a), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("log", ["ln", "db"])
def test_features_are_torch_stft_through_the_filter_bank(log: str) -> None:
    """torch.stft (centred, reflected ends, a periodic Hann window of win_length centred in
    n_fft), the power spectrum, the mel filters, the floored log: torchaudio's MelSpectrogram."""
    a = A.model_copy(update={"log": log})
    x = np.random.default_rng(0).standard_normal(12000) * 0.1  # shorter than 1 s: padded
    got = log_mel(x, a)
    assert got.shape == (40, 101) and got.dtype == np.float32
    padded = np.concatenate([x, np.zeros(a.samples - x.size)])
    spec = torch.stft(
        torch.tensor(padded), n_fft=400, hop_length=160, win_length=320,
        window=torch.hann_window(320, dtype=torch.float64), center=True, pad_mode="reflect",
        return_complex=True,
    )  # fmt: skip
    mel = np.maximum(filter_bank(a) @ (spec.abs() ** 2).numpy(), a.floor)
    want = np.log(mel) if log == "ln" else 10 * np.log10(mel)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=1e-4)


def test_a_tone_lights_the_mel_band_of_its_frequency() -> None:
    feats = log_mel(tone(1000.0, 1.0, 16000), A)
    centres = librosa.mel_frequencies(n_mels=42, fmin=0.0, fmax=8000.0, htk=True)[1:-1]
    assert abs(centres[int(np.argmax(feats[:, 50]))] - 1000.0) < 100.0


def test_a_clip_is_padded_or_cut_to_the_models_length() -> None:
    short, cut = fit(np.ones(100), A)
    assert short.shape == (A.samples,) and not cut and short[100:].max() == 0.0
    long, cut = fit(np.ones(A.samples + 1), A)
    assert long.shape == (A.samples,) and cut
    # Silence after the clip is what padding adds: features of a padded clip are its own.
    x = tone(440.0, 0.5, 16000)
    np.testing.assert_array_equal(log_mel(x, A), log_mel(np.concatenate([x, np.zeros(10)]), A))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_each_clip_reports_its_length_and_whether_it_was_cut() -> None:
    short, long = wav(tone(300.0, 0.25, 16000), 16000), wav(tone(300.0, 2.0, 16000), 16000)
    batch = encode_audio([short, _b64(long)], A)  # bytes (/v2's binary) or base64 text
    assert batch.x.shape == (2, 40, 101)
    assert batch.notes() == [
        {"seconds": 0.25, "truncated": False, "sample_rate": 16000},
        {"seconds": 2.0, "truncated": True, "sample_rate": 16000},
    ]


def test_a_clip_alone_and_beside_others_has_the_same_features() -> None:
    clips = [wav(tone(f, 0.7, 16000), 16000) for f in (200.0, 900.0, 3000.0)]
    together = encode_audio(clips, A).x
    for i, clip in enumerate(clips):
        assert encode_audio([clip], A).x[0].tobytes() == together[i].tobytes()


@pytest.mark.parametrize(
    ("clip", "error", "says"),
    [
        (
            wav(tone(300.0, 0.5, 8000), 8000),
            InvalidInputError,
            "sampled at 8000 Hz; this model reads 16000 Hz: resample it (e.g. ffmpeg -i IN -ar",
        ),
        ("not base64!", InvalidInputError, "not valid base64"),
        (_b64(b"RIFF" * 10), InvalidInputError, "not a WAV file"),
        (
            "A" * 14_000_000,
            PayloadTooLargeError,
            "the audio is 10500000 bytes, over this model's limit of 6000000",
        ),
        (bytes(6_000_001), PayloadTooLargeError, "over this model's limit of 6000000"),
        ("A" * 8_000_000 + "AA==", PayloadTooLargeError, "the audio is 6000001 bytes, over"),
        # Line-wrapped (MIME) base64 is refused as such; its size counted the line breaks.
        ("QUFB\n" * 2_000_000, InvalidInputError, "not valid base64 (standard alphabet"),
        ("QUFB " * 1_600_000 + "QUFB", InvalidInputError, "not valid base64"),  # no 413
    ],
)
def test_a_clip_the_model_cannot_read_is_refused_by_its_index(
    clip: bytes | str, error: type[Exception], says: str
) -> None:
    good = wav(tone(300.0, 0.5, 16000), 16000)
    with pytest.raises(error) as err:
        encode_audio([good, clip], A, "input 'input', element")
    assert str(err.value).startswith("input 'input', element 1: ")
    assert says in str(err.value)


def test_truncation_error_refuses_a_long_clip() -> None:
    a = A.model_copy(update={"truncation": "error"})
    with pytest.raises(
        InvalidInputError, match=re.escape("the clip is 1.5 s, over this model's 1 s")
    ):
        encode_audio([wav(tone(300.0, 1.5, 16000), 16000)], a)


def test_features_outside_the_value_range_are_said_of_the_clip() -> None:
    """It said "instance 1, element 0 = 69.7 is outside the valid range; check the value and its
    unit", of numbers the client never sent, and "instance" on /v2 too."""
    spec = InputSpec(shape=[1, 40, 101], audio=A, value_range=(-30.0, 10.0))
    ok = wav(tone(300.0, 1.1, 16000), 16000)  # its features: -23.03 to 6.47
    loud = wav(tone(300.0, 1.1, 16000, amp=300.0), 16000, dtype="float32")  # 300x too loud
    with pytest.raises(InvalidInputError) as err:
        audio_batch([ok, loud], spec, 4, "input 'input', element")
    assert re.match(
        r"input 'input', element 1: the clip's features run from -12\.\d+ to 20\.\d+, outside "
        r"this model's range \[-30, 10\]: is the clip clipped, mis-scaled",
        err.value.message,
    ), err.value.message
    open_range = spec.model_copy(update={"value_range": None})
    ok = audio_batch([wav(tone(300.0, 0.5, 16000), 16000)], open_range, 4)
    assert ok.x.shape == (1, 1, 40, 101)  # the spec's channel axis


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"win_length": 500}, "win_length 500 is over n_fft 400"),
        ({"f_max": 9000.0}, "must satisfy 0 <= f_min < f_max <= sample_rate / 2 (8000)"),
        ({"f_min": 4000.0, "f_max": 3000.0}, "f_min < f_max"),
        ({"frames": 2, "hop_length": 100}, "too short for n_fft 400"),
        ({"frames": 50_000}, "over 2^24 values a clip"),
        # an odd n_fft made frames - 1 frames: every request a reshape error, a 500
        ({"n_fft": 255, "win_length": None}, "audio.n_fft 255 must be even"),
        # 200 frames of n_fft 64 are few, but a hop of 65,536 pads every clip to 13 M samples
        ({"frames": 300, "n_fft": 64, "hop_length": 65536, "win_length": None}, "2^24 values"),
    ],
)
def test_an_inconsistent_audio_section_is_refused(fields: dict[str, object], says: str) -> None:
    base = {**A.model_dump(), **fields}
    with pytest.raises(ValidationError, match=re.escape(says)):
        AudioInput(**base)


def test_an_audio_input_has_the_features_shape() -> None:
    with pytest.raises(ValidationError, match="an audio input has dtype float32 and shape"):
        InputSpec(shape=[40, 100], audio=A)
    with pytest.raises(ValidationError, match="an audio input has dtype float32"):
        InputSpec(shape=[40, 101], audio=A, dtype="int64")


def test_log_mel_refuses_what_the_server_never_computes_on() -> None:
    """Training features of int16 samples (scipy's) were 90 dB above the served ones, and a
    stereo [n, 2] array (soundfile's) was read interleaved: the model learnt other features."""
    x = tone(440.0, 0.5, 16000)
    with pytest.raises(ValueError, match=r"float samples in \[-1, 1\], got int16.*2\*\*15"):
        log_mel((x * 32767).astype(np.int16), A)
    with pytest.raises(ValueError, match=r"got int32: .*divide by 2\*\*31"):  # not int16's
        log_mel((x * 2**30).astype(np.int32), A)
    with pytest.raises(ValueError, match=r"got uint8: .*\(x - 128\) / 128"):
        log_mel((x * 100 + 128).astype(np.uint8), A)
    # int64 holds samples of any depth (np.array of a list of int16s): "2**63" was wrong.
    with pytest.raises(ValueError, match=r"got int64: .*full scale of the bit depth"):
        log_mel((x * 32767).astype(np.int64), A)
    with pytest.raises(ValueError, match=r"mono clip of shape \[samples\], got \(8000, 2\)"):
        log_mel(np.stack([x, x], axis=1), A)
    # torchaudio's [channels, samples]: the advice names its axis too (axis=1 made a 2-sample
    # clip of silence, without a word).
    with pytest.raises(ValueError, match=r"axis=0 for torchaudio's \[channels, samples\]"):
        log_mel(np.stack([x, x]), A)


def test_clip_features_are_the_servers() -> None:
    stereo = np.stack([tone(440.0, 0.5, 16000), tone(880.0, 0.5, 16000)], axis=1)
    raw = wav(stereo, 16000)
    assert clip_features(raw, A).tobytes() == encode_audio([raw], A).x[0].tobytes()
    with pytest.raises(InvalidInputError, match="sampled at 8000 Hz; this model reads 16000"):
        clip_features(wav(tone(440.0, 0.5, 8000), 8000), A)


def test_a_filter_bank_that_is_not_finite_counts_as_empty() -> None:
    """An f_max of 1e-300 made filters of NaN, which passed as not empty: the bundle saved, and
    every clip's features were NaN."""
    for norm in (None, "slaney"):  # the Slaney norm divided outside the silenced warnings
        a = A.model_copy(update={"f_max": 1e-300, "norm": norm})
        assert not np.isfinite(filter_bank(a)).all()
        assert empty_filters(a) == list(range(40))
    assert empty_filters(A) == []
