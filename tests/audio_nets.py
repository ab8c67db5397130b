"""A small audio model trained on synthetic tones, and WAV files written by scipy, for the tests
of audio served from WAV files: "low" tones (200-600 Hz) against "high" ones (1.5-3 kHz)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io.wavfile
import torch
from torch import nn

from service.bundle.spec import AudioInput
from service.engine.audio import log_mel
from service.packaging import save

AUDIO = AudioInput(sample_rate=8000, n_fft=256, hop_length=128, n_mels=16, frames=32, log="db")
LABELS = ["low", "high"]


def tone(freq: float, seconds: float = 0.5, rate: int = 8000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def wav(samples: np.ndarray, rate: int = 8000, dtype: str = "int16") -> bytes:
    """A WAV file of the samples (in [-1, 1]) in the given sample type, as scipy writes it."""
    if dtype == "int16":
        data: np.ndarray = np.round(samples * 32767).astype(np.int16)
    elif dtype == "int32":
        data = np.round(samples * (2**31 - 1)).astype(np.int32)
    elif dtype == "uint8":
        data = np.round(samples * 127 + 128).astype(np.uint8)
    else:
        data = samples.astype(dtype)
    out = io.BytesIO()
    scipy.io.wavfile.write(out, rate, data)
    return out.getvalue()


class ToneNet(nn.Module):
    """A convolution over time on the log-mel frames, mean over time, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(AUDIO.n_mels, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, mels, frames], dB
        h = torch.relu(self.conv(x / 20.0 + 2.0)).mean(dim=2)
        return self.fc(self.drop(h))


def training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    feats = []
    for y in labels:
        freq = rng.uniform(200, 600) if y == 0 else rng.uniform(1500, 3000)
        clip = tone(freq, rng.uniform(0.2, 0.6), amp=rng.uniform(0.05, 0.5))
        feats.append(log_mel(clip + rng.normal(0, 0.01, clip.shape), AUDIO))
    return torch.tensor(np.stack(feats)), torch.tensor(labels)


def save_audio_model(
    root: Path, name: str = "tones", version: str = "1", resample: bool = False
) -> Path:
    """Train ToneNet on log_mel features of synthetic tones (about a second) and bundle it;
    `resample`: clips at another rate than 8 kHz are resampled, not refused."""
    torch.manual_seed(0)
    x, y = training_set(128, 0)
    net = ToneNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return save(
        net.eval(), x[:4], out_dir=root, name=name, version=version, task="classification",
        intended_use="tests", labels=LABELS, value_range=(-120.0, 60.0),
        audio=AUDIO.model_copy(update={"resample": resample}),
    )  # fmt: skip
