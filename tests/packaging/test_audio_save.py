"""`save(..., audio=...)`: what it refuses before any work, so that no bundle is written that
would refuse every clip once served, and the front end given as its fields."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from audio_nets import AUDIO, LABELS, ToneNet, tone, training_set

from service.bundle import load_bundle
from service.engine.audio import log_mel
from service.errors import ModelError
from service.packaging import save

X, _ = training_set(4, 0)  # dB features of tones: about -100 to 40


def _save(root: Path, **kw: Any) -> Path:
    torch.manual_seed(0)
    args: dict[str, Any] = {"audio": AUDIO, **kw}
    return save(
        ToneNet().eval(), X, out_dir=root, name="tones", version="1", task="classification",
        intended_use="tests", labels=LABELS, **args,
    )  # fmt: skip


def test_an_example_outside_its_own_value_range_is_refused(tmp_path: Path) -> None:
    """value_range=(0, 10) was written, and the served bundle refused every clip (422)."""
    said = r"the example features run from -\d.* outside value_range \[0\.0, 10\.0\]"
    with pytest.raises(ModelError, match=said):
        _save(tmp_path, value_range=(0.0, 10.0))
    assert not (tmp_path / "tones").exists()


def test_a_value_range_that_refuses_silence_is_refused(tmp_path: Path) -> None:
    """The training features' own min and max (padded by 5) were accepted, and every clip
    shorter than the model's, padded with silence at the floor, was refused once served."""
    rng = np.random.default_rng(0)
    clips = [tone(f, 0.6) + rng.normal(0, 0.01, 4800) for f in (300.0, 500.0, 2000.0, 2500.0)]
    full = torch.tensor(np.stack([log_mel(c, AUDIO) for c in clips]))  # longer than the model's
    low, high = float(full.min()), float(full.max())
    assert low > -100.0  # full-length noisy tones never reach the floor
    with pytest.raises(ModelError, match=r"does not hold the features of silence, -100\.0 \(db"):
        torch.manual_seed(0)
        save(
            ToneNet().eval(), full, out_dir=tmp_path, name="tones", version="1",
            task="classification", intended_use="tests", labels=LABELS, audio=AUDIO,
            value_range=(low - 5.0, high + 5.0),
        )  # fmt: skip


@pytest.mark.parametrize("truncation", ["error", "truncate"])
def test_the_text_truncation_argument_is_refused_for_audio(tmp_path: Path, truncation: str) -> None:
    """truncation="error" was silently ignored: the manifest said "truncate" (and "truncate",
    given, could not be told from the default)."""
    with pytest.raises(ModelError, match=r"AudioInput\(truncation=\.\.\.\)"):
        _save(tmp_path, truncation=truncation)
    with pytest.raises(ModelError, match="audio= takes an AudioInput or its fields, got str"):
        _save(tmp_path, audio="16 kHz")


def test_the_front_end_may_be_given_as_its_fields(tmp_path: Path) -> None:
    """A dict was a TypeError ("unhashable type: 'dict'") from deep inside."""
    with pytest.raises(ModelError, match=r"audio\.sample_rate: Field required"):
        _save(tmp_path, audio={"n_fft": 256, "hop_length": 128, "n_mels": 16, "frames": 32})
    path = _save(tmp_path, audio=AUDIO.model_dump(), value_range=(-120.0, 60.0))
    assert load_bundle(path).manifest.inputs.audio == AUDIO


def test_the_floor_is_checked_as_the_server_computes_it(tmp_path: Path) -> None:
    """A range ending at ln(1e-8) in float64 was accepted, and every short clip refused: the
    served features are float32, and float32(ln 1e-8) is under it. The refusal's advice, to
    four digits, was refused again."""
    front = AUDIO.model_copy(update={"log": "ln", "floor": 1e-8})
    rng = np.random.default_rng(0)
    clips = [tone(f, 0.6) + rng.normal(0, 0.01, 4800) for f in (300.0, 2500.0)]
    example = torch.tensor(np.stack([log_mel(c, front) for c in clips]))
    high = float(example.max()) + 1.0

    def packed(low: float) -> Path:
        torch.manual_seed(0)
        return save(
            ToneNet().eval(), example, out_dir=tmp_path, name="tones", version="1",
            task="classification", intended_use="tests", labels=LABELS, audio=front,
            value_range=(low, high),
        )  # fmt: skip

    with pytest.raises(ModelError) as err:
        packed(math.log(1e-8))
    advised = float(re.findall(r"widen it to hold (\S+)$", err.value.message)[0])
    assert advised == float(np.float32(math.log(1e-8)))
    packed(advised)  # the advice taken is accepted
