"""`save(..., audio=...)`: what it refuses before any work, so that no bundle is written that
would refuse every clip once served, and the front end given as its fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from audio_nets import AUDIO, LABELS, ToneNet, training_set

from service.bundle import load_bundle
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


def test_the_text_truncation_argument_is_refused_for_audio(tmp_path: Path) -> None:
    """truncation="error" was silently ignored: the manifest said "truncate"."""
    with pytest.raises(ModelError, match=r"AudioInput\(truncation=\.\.\.\)"):
        _save(tmp_path, truncation="error")


def test_the_front_end_may_be_given_as_its_fields(tmp_path: Path) -> None:
    """A dict was a TypeError ("unhashable type: 'dict'") from deep inside."""
    with pytest.raises(ModelError, match=r"audio\.sample_rate: Field required"):
        _save(tmp_path, audio={"n_fft": 256, "hop_length": 128, "n_mels": 16, "frames": 32})
    path = _save(tmp_path, audio=AUDIO.model_dump(), value_range=(-120.0, 60.0))
    assert load_bundle(path).manifest.inputs.audio == AUDIO
