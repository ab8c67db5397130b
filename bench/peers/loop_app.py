"""Peer (b): the tutorial approach, a FastAPI endpoint running `for _ in range(T): model(x)`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.peers.models import load, mc_mode, summary

MODEL = os.environ.get("PEER_MODEL", "breast-cancer")
module, shape = load(MODEL)
model = mc_mode(module)
app = FastAPI()


@app.post("/predict")
def predict(body: dict[str, Any]) -> dict[str, Any]:
    x = torch.tensor(body["instances"], dtype=torch.float32).reshape(-1, *shape)
    passes = int(body.get("parameters", {}).get("samples", 100))
    with torch.inference_mode():
        logits = torch.stack([model(x) for _ in range(passes)])
    return summary(logits)


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8003)
    args = ap.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
