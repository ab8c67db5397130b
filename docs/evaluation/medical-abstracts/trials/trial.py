"""One model-selection trial for medical-abstracts (docs/MODELS.md): fit on the training rows,
score on the calibration rows only (MC T = 20, seed 0, and dropout off); test rows untouched.

    cd <repository> && PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/evaluation/medical-abstracts/trials/trial.py \
        '{"arch":"fasttext","vocab_size":4000,"max_tokens":900,"lr":5e-3,"max_epochs":100}'

"variant"/"vkw" select a network from variants.py instead of text_nets (bigrams, SWEM, DAN).
Appends a line to results.jsonl here. Kept as run, not part of the linted code.
"""
import json, sys, time
from pathlib import Path
TRIALS = Path(__file__).resolve().parent
import numpy as np, torch
torch.set_num_threads(1)
from models import medical_abstracts as r
from models import common
from service.training.text import fit_text, PATIENCE
import service.training.text as T
from service.training.text_data import encode, read_splits, read_text_table
from service.engine.sampler import MCRequest, MCSampler
cfg = json.loads(sys.argv[1])
common.configure_determinism(r.SEED)
table = read_text_table(r.DATA / "medical_tc_test.csv", "condition_label", "medical_abstract")
parts = read_splits(r.DATA / "splits.csv", len(table.texts))
y = np.array([int(v) - 1 for v in table.values])
tr, cal = parts["train"], parts["calibration"]
mt = cfg.pop("max_tokens"); me = cfg.pop("max_epochs", 60)
var = cfg.pop("variant", None); vkw = cfg.pop("vkw", {})
if var:
    sys.path.insert(0, str(TRIALS)); import variants; variants.install(var, **vkw)
if "patience" in cfg: T.PATIENCE = cfg.pop("patience")
t0 = time.time()
fit = fit_text([table.texts[i] for i in tr], y[tr], 5, max_tokens=mt, seed=r.SEED, max_epochs=me, **cfg)
dt = time.time() - t0
ids = encode(fit.tokenizer, [table.texts[i] for i in cal], mt)
with torch.inference_mode():
    z = fit.module(torch.as_tensor(ids)).double()
pd = torch.softmax(z, -1).numpy()
s = MCSampler(fit.module, torch.as_tensor(ids[:2]), device="cpu")
t1 = time.time()
lg = s.run([MCRequest(ids, 20, 0)])[0]
dmc = time.time() - t1
p = torch.softmax(torch.as_tensor(lg, dtype=torch.float64), -1).mean(0).numpy()
yc = y[cal]
def nll(p): return float(-np.log(np.clip(p[np.arange(len(yc)), yc], 1e-12, 1)).mean())
out = dict(cfg=sys.argv[1], train_s=round(dt,1), epochs=fit.epochs_run, best=fit.best_epoch, val_nll=round(fit.best_val_nll,4),
  cal_det_acc=round(float((pd.argmax(1)==yc).mean()),4), cal_det_nll=round(nll(pd),4),
  cal_mc20_acc=round(float((p.argmax(1)==yc).mean()),4), cal_mc20_nll=round(nll(p),4), mc20_s=round(dmc,1),
  params=sum(x.numel() for x in fit.module.parameters()))
import hashlib
key = hashlib.sha1(sys.argv[1].encode()).hexdigest()[:8]
out["key"] = key
np.save(f"/tmp/p_{key}_det.npy", pd); np.save(f"/tmp/p_{key}_mc.npy", p)
torch.save({"state": fit.module.state_dict(), "config": fit.config.describe()}, f"/tmp/m_{key}.pt")
print(json.dumps(out), flush=True)
with open(TRIALS / "results.jsonl", "a") as f: f.write(json.dumps(out) + "\n")
