"""The bundled models' weights for peers: rebuilt from the declarative architecture."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from service.bundle.architecture import rebuild

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, version: str = "1") -> tuple[nn.Module, list[int]]:
    path = ROOT / "models" / name / version
    manifest = json.loads((path / "manifest.json").read_text())
    desc = json.loads((path / "architecture.json").read_text())
    module = rebuild(desc, load_file(str(path / "weights.safetensors")))
    return module, manifest["inputs"]["shape"]


def mc_mode(module: nn.Module) -> nn.Module:
    """The usual recipe: eval() everywhere, then dropout modules back to train()."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return module


def summary(logits: torch.Tensor) -> dict[str, list[float]]:
    """[T, B, K] -> mean and std of the per-pass softmax (what a client needs at least)."""
    p = torch.softmax(logits, dim=-1)
    return {"probabilities": p.mean(0).tolist(), "std": p.std(0).tolist()}
