"""Clips at another sample rate (service/engine/resample.py, `inputs.audio.resample`): the same
samples as scipy.signal.resample_poly, a long file's first outputs from its first samples alone,
and the features a bundle that resamples serves; refused where the bundle does not resample
or the rates have no usable common ratio."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.signal
from audio_nets import tone, wav

from service.bundle.spec import AudioInput
from service.engine.audio import encode_audio, log_mel
from service.engine.resample import MAX_FACTOR, factors, needed, resample
from service.errors import InvalidInputError

A = AudioInput(
    sample_rate=16000, n_fft=400, win_length=320, hop_length=160, n_mels=40, frames=101,
    resample=True,
)  # fmt: skip
PAIRS = [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000), (16000, 8000),
         (11025, 22050), (96000, 8000), (32000, 16000)]  # fmt: skip


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS)
def test_the_samples_are_scipys_resample_poly(rate_in: int, rate_out: int) -> None:
    f = factors(rate_in, rate_out)
    assert f is not None
    up, down = f
    rng = np.random.default_rng(rate_in + rate_out)
    for n in (1, 2, 7, 101, 4410):
        x = rng.normal(size=n)
        ours, theirs = resample(x, up, down), scipy.signal.resample_poly(x, up, down)
        assert ours.shape == theirs.shape
        # Summed in another order than scipy's C loop: equal to float64 rounding.
        assert np.max(np.abs(ours - theirs)) <= 1e-13 * max(1.0, np.max(np.abs(theirs)))


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS)
def test_the_first_outputs_need_only_the_first_inputs(rate_in: int, rate_out: int) -> None:
    """What lets the server decode a long file's start only: the same bits as the whole."""
    up, down = factors(rate_in, rate_out) or (0, 0)
    x = np.random.default_rng(1).normal(size=3 * rate_in)
    whole = resample(x, up, down)
    for n in (1, 50, rate_out // 3):
        m = needed(n, up, down)
        assert m < len(x)
        assert resample(x[:m], up, down, n).tobytes() == whole[:n].tobytes()


def test_factors_reduce_the_ratio_and_refuse_what_has_no_small_one() -> None:
    assert factors(44100, 16000) == (160, 441)
    assert factors(48000, 16000) == (1, 3)
    assert factors(16000, 16000) == (1, 1)
    assert factors(44101, 16000) is None  # 16000 / 44101: no common divisor
    assert factors(MAX_FACTOR, 1001) == (1001, MAX_FACTOR)  # coprime, at the bound
    assert factors(MAX_FACTOR + 1, 1001) is None
    # A header may say any rate: outside what a model may declare, none (review L: 65.536 MHz
    # to 16 kHz decoded and filtered the whole file, 20 times its size in memory).
    assert factors(999, 16000) is None and factors(384_001, 16000) is None
    assert factors(65_536_000, 16000) is None and factors(4, 16000) is None


def test_a_clip_at_another_rate_is_served_as_resampled_by_scipy() -> None:
    clip = tone(700.0, 0.6, 44100) + np.random.default_rng(2).normal(0, 0.01, 26460)
    raw = wav(np.clip(clip, -1, 1), 44100)
    batch = encode_audio([raw], A)
    pcm = np.frombuffer(raw[44:], dtype="<i2") / 32768.0  # scipy's file: a 44-byte header
    expected = log_mel(scipy.signal.resample_poly(pcm, 160, 441), A)
    np.testing.assert_allclose(batch.x[0], expected, rtol=0, atol=1e-4)
    assert batch.notes() == [{"seconds": 0.6, "truncated": False, "sample_rate": 44100}]


def test_a_long_file_is_cut_after_resampling_with_its_whole_length_reported() -> None:
    rate = 48000
    long = np.random.default_rng(3).uniform(-0.5, 0.5, 60 * rate)  # 60 s, the model reads 1 s
    raw = wav(long, rate)
    batch = encode_audio([raw], A)
    pcm = np.frombuffer(raw[44:], dtype="<i2") / 32768.0
    cut = scipy.signal.resample_poly(pcm, 1, 3)[: A.samples]
    np.testing.assert_allclose(batch.x[0], log_mel(cut, A), rtol=0, atol=1e-4)
    assert batch.notes() == [{"seconds": 60.0, "truncated": True, "sample_rate": 48000}]
    strict = A.model_copy(update={"truncation": "error"})
    with pytest.raises(InvalidInputError, match=r"instance 0: the clip is 60 s, over this model"):
        encode_audio([raw], strict)


def test_another_rate_is_refused_without_resample_or_without_a_usable_ratio() -> None:
    fixed = A.model_copy(update={"resample": False})
    with pytest.raises(InvalidInputError) as err:
        encode_audio([wav(tone(300.0, 0.5, 44100), 44100)], fixed)
    fix = "resample it (e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)"
    assert str(err.value) == (
        f"instance 0: the clip is sampled at 44100 Hz; this model reads 16000 Hz: {fix}; this "
        "model does not resample"
    )
    with pytest.raises(InvalidInputError) as err:
        encode_audio([wav(tone(300.0, 0.5, 44101), 44101)], A)
    assert str(err.value) == (
        f"instance 0: the clip is sampled at 44101 Hz; this model reads 16000 Hz: {fix}; the "
        f"server resamples only between rates whose ratio reduces to terms of at most "
        f"{MAX_FACTOR} (16000:44101 does not)"
    )


def test_a_file_at_an_unusable_rate_is_refused_having_decoded_only_the_clip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.engine import audio

    decoded: list[int] = []
    real = audio.read_wav

    def reading(data: bytes, *args: Any, max_frames: Any = None) -> Any:
        clip = real(data, *args, max_frames=max_frames)
        decoded.append(len(clip.samples))
        return clip

    monkeypatch.setattr(audio, "read_wav", reading)
    fix = "resample it (e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)"
    for rate in (4, 999, 384_001):
        raw = wav(np.zeros(200_000), rate)
        with pytest.raises(InvalidInputError) as err:
            encode_audio([raw], A)
        assert str(err.value) == (
            f"instance 0: the clip is sampled at {rate} Hz; this model reads 16000 Hz: {fix}; "
            "the server resamples files of 1000 to 384000 Hz"
        )
    assert decoded == [A.samples + 1] * 3  # the model's clip, not the file


def test_a_long_clip_under_truncation_error_is_refused_before_it_is_filtered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.engine import audio

    filtered: list[int] = []
    real = audio.resample

    def counting(x: np.ndarray, *args: Any) -> np.ndarray:
        filtered.append(len(x))
        return real(x, *args)

    monkeypatch.setattr(audio, "resample", counting)
    strict = A.model_copy(update={"truncation": "error"})
    with pytest.raises(InvalidInputError, match="the clip is 2 s, over this model's 1 s"):
        encode_audio([wav(tone(300.0, 2.0, 44100), 44100)], strict)
    assert filtered == []
    encode_audio([wav(tone(300.0, 0.5, 44100), 44100)], strict)  # within: filtered, served
    assert len(filtered) == 1
