"""`python -m service train` for text: a CSV of texts and labels in, a calibrated bundle out.

1. Rows: `--splits FILE` (train / calibration / test rows, e.g. a data set's fixed, grouped
   splits; test rows are not touched), else the tabular cut: a seeded permutation, 80/20.
2. A WordPiece tokenizer is fitted on the training rows only (`text_data.train_tokenizer`).
3. The network (`text_nets`, `--arch`) trains with Adam on 7/8 of the training rows; the other
   1/8 (seeded) decides when to stop: the weights of the epoch with the lowest held-out NLL
   (dropout off) are kept, and training stops after `PATIENCE` epochs without improvement.
4. Version N is saved with the tokenizer, then calibrated on the calibration rows into N + 1
   exactly as tabular models are (`versions.write_calibrated`: temperature, conformal scores,
   referral; both are staged and renamed into place only when both are done).

Seeded throughout (split, tokenizer, initialisation, shuffles, dropout masks), so the same CSV,
flags and machine give the same weights when torch runs on one thread with deterministic kernels
(`models/` builds do; the CLI leaves torch's thread count alone).
"""

from __future__ import annotations

import copy
import csv
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Defaults, Training
from service.errors import InvalidInputError
from service.packaging import save
from service.training.progress import progress as _progress
from service.training.text_data import TextTable, encode, train_tokenizer
from service.training.text_nets import Arch, TextNetConfig, TfIdf, build
from service.training.word_vectors import WordVectors, initialise

PATIENCE = 5  # epochs without a lower held-out NLL before stopping
HOLDOUT = 8  # 1 / HOLDOUT of the training rows decide early stopping
BATCH = 32
METRIC_PASSES = 100
EMBEDDED: tuple[Arch, ...] = ("textcnn", "bilstm", "fasttext")  # embedding `embed` wide


@dataclass(frozen=True)
class TextFit:
    module: nn.Module  # eval mode, best epoch's weights
    tokenizer: Any
    config: TextNetConfig
    epochs_run: int
    best_epoch: int  # 1-based
    best_val_nll: float
    history: list[dict[str, float]]
    n_fit: int
    n_val: int
    word_vectors: dict[str, Any] | None = None  # what initialised the embedding, if anything


def _val_nll(net: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.inference_mode():
        logits = torch.cat([net(ids[s : s + 256]) for s in range(0, len(ids), 256)])
    nll = float(nn.functional.cross_entropy(logits, y))
    return nll, float((logits.argmax(-1) == y).double().mean())


def fit_text(
    texts: list[str],
    y: np.ndarray,
    n_classes: int,
    *,
    arch: Arch,
    max_tokens: int,
    seed: int,
    max_epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    vocab_size: int | None = None,
    embed: int = 64,
    width: int = 64,
    dropout: float = 0.5,
    progress: bool = False,
    word_vectors: WordVectors | None = None,
    tokenizer: Any = None,
) -> TextFit:
    """Tokenizer and network fitted on `texts` (the training rows, and nothing else).
    `word_vectors` start the embedding (its width becomes theirs; `word_vectors.py`);
    ``tokenizer``: one already fitted on `texts` (`train` checks the calibration texts with it
    before training), else fitted here."""
    if word_vectors is not None:
        check_embedded(arch)
        embed = word_vectors.dim
    tok = tokenizer if tokenizer is not None else train_tokenizer(texts, vocab_size)
    ids = torch.as_tensor(encode(tok, texts, max_tokens))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    n = len(texts)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    n_val = max(1, n // HOLDOUT)
    if n - n_val < 2:
        raise InvalidInputError(f"{n} training rows are too few for a text model")
    val, fit = torch.as_tensor(np.sort(perm[:n_val])), torch.as_tensor(np.sort(perm[n_val:]))
    config = TextNetConfig(
        arch, tok.get_vocab_size(), max_tokens, n_classes, embed=embed, width=width,
        dropout=dropout,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation and dropout masks
        net = build(config, ids)
        used = None
        if word_vectors is not None:
            emb = net.get_submodule("emb")
            assert isinstance(emb, nn.Embedding)  # EMBEDDED networks
            covered = initialise(emb, tok.get_vocab(), word_vectors, config.pad)
            if covered == 0:  # e.g. another language, or not GloVe's format: say so, not train
                raise InvalidInputError(
                    f"--word-vectors {word_vectors.source}: none of the {config.vocab} "
                    "vocabulary entries is a word of the file (matched as written, then "
                    "lowercased); is it for this language, in GloVe's text format?"
                )
            used = word_vectors.describe(covered, config.vocab)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        shuffle = torch.Generator().manual_seed(seed)
        best = (math.inf, 0, copy.deepcopy(net.state_dict()))
        history: list[dict[str, float]] = []
        with _progress(progress, max_epochs, f"{arch} (max {max_epochs} epochs)") as cb:
            for epoch in range(1, max_epochs + 1):
                net.train()
                order = fit[torch.randperm(len(fit), generator=shuffle)]
                total = 0.0
                for s in range(0, len(order), BATCH):
                    b = order[s : s + BATCH]
                    opt.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(net(ids[b]), yt[b])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                v_nll, v_acc = _val_nll(net, ids[val], yt[val])
                history.append({"loss": total / len(fit), "val_nll": v_nll, "val_accuracy": v_acc})
                if cb is not None:
                    cb(epoch - 1, v_nll)
                if v_nll < best[0]:
                    best = (v_nll, epoch, copy.deepcopy(net.state_dict()))
                elif epoch - best[1] >= PATIENCE:
                    break
    net.load_state_dict(best[2])
    if isinstance(net, TfIdf):
        net.compact()  # the buckets no training text filled: dropped from the bundle
    return TextFit(
        net.eval(), tok, config, len(history), best[1], best[0], history, len(fit), n_val, used
    )


def check_embedded(arch: str) -> None:
    """Word vectors start an embedding: refuse a network without one (before reading them)."""
    if arch not in EMBEDDED:
        raise InvalidInputError(
            f"--word-vectors: the {arch} network has no word embedding they can start; "
            f"use --arch {' or '.join(EMBEDDED)}"
        )


def mc_metrics(module: nn.Module, ids: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """Accuracy and NLL of the MC predictive on held-out ids (the engine's sampler)."""
    from service.engine.sampler import MCRequest, MCSampler

    if len(ids) == 0:
        return {}
    sampler = MCSampler(copy.deepcopy(module), torch.as_tensor(ids[:2]), device="cpu")
    logits = sampler.run([MCRequest(ids, METRIC_PASSES, seed)])[0]
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).mean(0).numpy()
    p_true = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
    return {
        "accuracy": round(float((p.argmax(-1) == y).mean()), 6),
        "nll": round(float(-np.log(p_true).mean()), 6),
    }


def write_text_csv(dest: Path, texts: list[str], targets: list[str]) -> None:
    """`text,target` rows, quoted as needed (texts may hold commas, quotes and newlines)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "target"])
        w.writerows(zip(texts, targets, strict=True))


def save_text_bundle(
    result: TextFit,
    example_ids: np.ndarray,
    *,
    out: Path,
    name: str,
    version: str,
    labels: list[str],
    target: str,
    intended_use: str,
    provenance: dict[str, Any],
    metrics: dict[str, float],
    fingerprints: dict[str, list[str]],
    extra: dict[str, Any] | None = None,
    training_texts: list[str] | None = None,
    word_min_texts: int = 2,
) -> Path:
    return save(
        result.module,
        torch.as_tensor(example_ids[:4]),
        out_dir=out,
        name=name,
        version=version,
        task="classification",
        intended_use=intended_use,
        labels=labels,
        target=target,
        defaults=Defaults(samples=METRIC_PASSES, confidence=0.95, interval="gaussian"),
        training=Training(provenance=provenance, metrics=metrics, row_fingerprints=fingerprints),
        extra=extra,
        tokenizer=result.tokenizer,
        truncation="truncate",
        training_texts=training_texts,
        word_min_texts=word_min_texts,
    )


def provenance(table: TextTable, fit: TextFit, split: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "dataset": f"{table.path.name} (sha256 {table.sha256})",
        "text_column": table.text_column,
        "seed": seed,
        "split": split,
        "tokenizer": {
            "type": "WordPiece, BertNormalizer(lowercase), BertPreTokenizer",
            "fitted_on": "training rows only",
            "vocabulary": fit.tokenizer.get_vocab_size(),
        },
        "hyperparameters": fit.config.describe()
        | {
            "optimizer": "Adam",
            "batch_size": BATCH,
            "early_stopping": f"lowest NLL on 1/{HOLDOUT} of the training rows, patience "
            f"{PATIENCE}",
            "fit_rows": fit.n_fit,
            "validation_rows": fit.n_val,
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "best_validation_nll": round(fit.best_val_nll, 6),
        }
        | ({"word_vectors": fit.word_vectors} if fit.word_vectors else {}),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }


def fingerprints(ids: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {k: row_fingerprint(ids[v]) for k, v in parts.items() if len(v)}
