"""What serving audio from WAV files costs per clip, against the same clip's features sent as
numbers (the only way before `inputs.audio`) and against one MC prediction.

    python -m bench.audio [--repeats 15] [--clips 32]

A 1 s clip at 16 kHz (16-bit PCM), the front end of docs/BUNDLES.md's example (n_fft 400, win
320, hop 160, 40 mels, 101 frames). Per request of `--clips` clips, the median seconds of:
- "wav": what /v1 does with `{"b64": ...}` instances: base64 decode, WAV read, log-mel, checks
  (service.engine.audio.instances_batch);
- "wav, 44.1 kHz resampled": the same at 44.1 kHz, to a model whose bundle resamples (one
  clip's file repeated: resampling to 16 kHz, service/engine/resample.py, then as "wav");
- "numbers": what /v1 does with the same features as nested lists: the JSON parse (orjson)
  and service.engine.inputs.to_array;
- "mc": one MC prediction (T = 20) of those clips by a small keyword spotter (1-D convolution, a
  2-layer bidirectional GRU, tests/bundle/test_audio_features.py's shape at 101 frames),
  the engine's own compute, as the baseline for the ratios.
Also the request body's size in each form. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import torch
from torch import nn

from bench.common import machine, median, now
from service.bundle import load_bundle
from service.bundle.spec import AudioInput, InputSpec
from service.engine.audio import log_mel
from service.engine.clips import instances_batch
from service.engine.inputs import to_array
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.packaging import save

FRONT = AudioInput(sample_rate=16000, n_fft=400, win_length=320, hop_length=160, n_mels=40,
                   frames=101, log="db")  # fmt: skip


class Spotter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(40, 32, 5, padding=2)
        self.rnn = nn.GRU(32, 32, num_layers=2, dropout=0.3, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2)
        _, state = self.rnn(h)
        return self.fc(self.drop(torch.cat([state[-2], state[-1]], dim=1)))


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--clips", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, 16000) for _ in range(args.clips)]
    spec = InputSpec(shape=[40, 101], audio=FRONT)
    instances = [{"b64": base64.b64encode(_wav(c)).decode()} for c in clips]
    wav_body = orjson.dumps({"instances": instances})
    # The same clips recorded at 44.1 kHz, to a model whose bundle resamples (16 kHz).
    at_44k = [{"b64": base64.b64encode(_wav(rng.normal(0, 0.1, 44100), 44100)).decode()}]
    resampling = InputSpec(shape=[40, 101], audio=FRONT.model_copy(update={"resample": True}))
    resampled_body = orjson.dumps({"instances": at_44k * args.clips})
    feats = [log_mel(c, FRONT).tolist() for c in clips]
    numbers_body = orjson.dumps({"instances": feats})
    plain = InputSpec(shape=[40, 101])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        x = torch.tensor(np.stack([log_mel(c, FRONT) for c in clips[:4]]))
        path = save(
            Spotter().eval(), x, out_dir=Path(tmp), name="k", version="1",
            task="classification", labels=list("abcd"), intended_use="bench", audio=FRONT,
        )  # fmt: skip
        served = ServedModel(load_bundle(path))
    batch = instances_batch(orjson.loads(wav_body)["instances"], spec, args.clips).x
    params = PredictParams(samples=20, confidence=(0.95,), seed=1)
    served.predict(batch, params)  # warm

    def wav() -> object:
        return instances_batch(orjson.loads(wav_body)["instances"], spec, 4096)

    def resampled() -> object:
        return instances_batch(orjson.loads(resampled_body)["instances"], resampling, 4096)

    def numbers() -> object:
        return to_array(orjson.loads(numbers_body)["instances"], plain, 4096)

    rows = {
        "wav": _median_s(wav, args.repeats),
        "wav, 44.1 kHz resampled": _median_s(resampled, args.repeats),
        "numbers": _median_s(numbers, args.repeats),
        "mc": _median_s(lambda: served.predict(batch, params), args.repeats),
    }
    print(f"{machine()}, {now()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.clips} clips of 1 s a request, {args.repeats} repeats, medians\n")
    print("| input | body (bytes) | s per request | ms per clip | / MC prediction (T = 20) |")
    print("|---|---:|---:|---:|---:|")
    sizes = {"wav": len(wav_body), "numbers": len(numbers_body), "mc": 0}
    sizes["wav, 44.1 kHz resampled"] = len(resampled_body)
    for name, s in rows.items():
        size = f"{sizes[name]:,}" if sizes[name] else "–"
        print(f"| {name} | {size} | {s:.4f} | {1000 * s / args.clips:.2f} | {s / rows['mc']:.2f} |")


if __name__ == "__main__":
    main()
