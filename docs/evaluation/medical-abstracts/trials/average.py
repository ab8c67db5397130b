"""The averaging trial (docs/MODELS.md): the TextCNN of versions 1-2 (MC T = 20, seed 0, on the
calibration rows) averaged with the fasttext trial's calibration-row probabilities (run trial.py
with '{"arch":"fasttext","vocab_size":4000,"max_tokens":900,"lr":5e-3,"max_epochs":100}' first:
it writes /tmp/p_ee2831e7_mc.npy). Prints accuracy and NLL for weights 0.3 / 0.5 / 0.7 on the
TextCNN; the recipe uses 0.5 (chosen before looking: the plain average).

    cd <repository> && PYTHONPATH=$PWD python docs/evaluation/medical-abstracts/trials/average.py
"""
import numpy as np, torch
torch.set_num_threads(1)
from service.bundle.load import load_bundle
from service.engine.model import ServedModel
from service.engine.sampler import MCRequest
from service.calibration.data import read
s = ServedModel(load_bundle("models/medical-abstracts/1"), device="cpu")
rows = read("models/data/medical-abstracts-calibration.csv", s.manifest, tokenizer=s.bundle.tokenizer)
lg = s.sampler.run([MCRequest(rows.x, 20, 0)])[0]
p = torch.softmax(torch.as_tensor(lg, dtype=torch.float64), -1).mean(0).numpy()
y = rows.y
def nll(p): return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())
print("textcnn", (p.argmax(1) == y).mean(), nll(p))
q = np.load("/tmp/p_ee2831e7_mc.npy")
print("fasttext", (q.argmax(1) == y).mean(), nll(q))
for w in (0.3, 0.5, 0.7):
    a = w * p + (1 - w) * q
    print("average, weight on the TextCNN", w, (a.argmax(1) == y).mean(), round(nll(a), 4))
