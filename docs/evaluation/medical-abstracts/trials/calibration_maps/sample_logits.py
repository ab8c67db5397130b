"""Per-pass MC logits of medical-abstracts version 8 (the uncalibrated network; version 9 is the
same artifacts + vector scaling) on the calibration and test CSVs, exactly as `service evaluate`
/ `service calibrate` get them: ServedModel(load_bundle(...), device="cpu"), data.read(...),
one MCRequest(x, T, seed, sites=manifest.sampled_sites), served.sample([req])[0] -> [T, N, K].
Writes logits.npz in this directory. Run with the repository's venv (.venv/bin/python this file)."""
import sys, time
from pathlib import Path
import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[5]))
from service.bundle.load import load_bundle
from service.calibration.data import read
from service.engine.model import ServedModel
from service.engine.sampler import MCRequest

ROOT = Path(__file__).resolve().parents[5]
OUT = Path(__file__).resolve().parent
T, SEED = 100, 0

served = ServedModel(load_bundle(ROOT / "models/medical-abstracts/8"), device="cpu")
m = served.manifest
print("model", m.name, m.version, "digest", served.digest, "labels", m.outputs.labels, flush=True)
save = {}
for split, fn in [("cal", "medical-abstracts-calibration.csv"), ("test", "medical-abstracts-test.csv")]:
    rows = read(ROOT / "models/data" / fn, m, None, served.bundle.tokenizer)  # strict `target`
    t0 = time.time()
    req = MCRequest(rows.x, T, SEED, sites=m.sampled_sites)
    out = served.sample([req])[0]
    print(split, fn, out.shape, f"{time.time() - t0:.1f}s", "sha", rows.sha256[:16], flush=True)
    save[f"{split}_logits"] = np.asarray(out, dtype=np.float32)
    save[f"{split}_y"] = rows.y
    save[f"{split}_groups"] = rows.groups
np.savez_compressed(OUT / "logits.npz", **save)
print("wrote", OUT / "logits.npz")
