"""Peer (a): LitServe, max_batch_size=64, batch_timeout=0.005, one worker, the batch's MC as one
vectorised forward. Runs in its own virtual environment (bench/peers/setup.sh)."""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import litserve as ls

from bench.peers.models import load, mc_mode

MODEL = os.environ.get("PEER_MODEL", "breast-cancer")


class MCDropoutAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        module, self.shape = load(MODEL)
        self.model = mc_mode(module)

    # No annotation on `request`: LitServe reads it to pick the request type (JSON body here).
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        x = torch.tensor(request["instances"], dtype=torch.float32).reshape(-1, *self.shape)
        return x, int(request.get("parameters", {}).get("samples", 100))

    def batch(self, inputs: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int], int]:
        sizes = [x.shape[0] for x, _ in inputs]
        return torch.cat([x for x, _ in inputs]), sizes, inputs[0][1]

    def predict(self, batch: tuple[torch.Tensor, list[int], int]) -> list[dict[str, Any]]:
        x, sizes, passes = batch
        with torch.inference_mode():
            rows = self.model(x.repeat(passes, *([1] * (x.dim() - 1))))
        logits = rows.reshape(passes, x.shape[0], -1)
        p = torch.softmax(logits, dim=-1)
        mean, std = p.mean(0), p.std(0)
        out, lo = [], 0
        for n in sizes:
            part = slice(lo, lo + n)
            out.append({"probabilities": mean[part].tolist(), "std": std[part].tolist()})
            lo += n
        return out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8002)
    args = ap.parse_args()
    api = MCDropoutAPI(max_batch_size=64, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, healthcheck_path="/readyz")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)
