"""Text-model benchmark (issue 20, item 8): documents per second at T = 20 on the CPU.

    python -m bench.text [--rounds 5] [--length 256] [--batch 32] [--json FILE]

Models: a 2-layer transformer encoder classifier (d = 128, 4 heads, feed-forward 256, dropout
0.1, learned positions, masked mean pooling) and a 2-layer bidirectional LSTM classifier
(dropout 0.3 between layers and on the last states), both on `--length` tokens.
Variants, interleaved round by round (medians reported):
(a) a Python loop of T forwards with the dropout modules in train mode (torch's own sites: for the
    transformer that is every site, including the attention weights; the LSTM's between-layer
    dropout in its fused kernel);
(b) one vectorised forward of T copies (`x.repeat(T, 1)`, dropout modules in train mode: the
    tutorial's MC dropout);
(c) the engine (explicit sites, prefix once per input, fused masks), through a packaged bundle.

    python -m bench.text --buckets [--rounds 5] [--length 256] [--batch 32] [--json FILE]

Length buckets (issue 20 item 5): the transformer packaged as a text model twice, the same
weights, with buckets ("auto": 16, 32, ... up to --length) and without (every text padded to
--length); documents per second at T = 20 over a mix of three short texts (8 to 40 tokens) to
one long (200 to --length), one request, interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

import torch
from torch import nn

from bench.common import machine, median, now, timed
from service.bundle import load_bundle
from service.engine import MCRequest
from service.engine.model import ServedModel
from service.packaging import save

T = 20
VOCAB, PAD = 8000, 0


class Transformer(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 128, padding_idx=PAD)
        self.pos = nn.Embedding(length, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(128, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens.eq(PAD)
        x = self.emb(tokens) + self.pos(torch.arange(tokens.size(1), device=tokens.device))
        x = self.enc(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.fc(self.drop((x * keep).sum(1) / keep.sum(1).clamp(min=1.0)))


class LSTM(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 128, padding_idx=PAD)
        self.rnn = nn.LSTM(
            128, 128, num_layers=2, dropout=0.3, batch_first=True, bidirectional=True
        )
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(256, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.emb(tokens))
        return self.fc(self.drop(torch.cat([h[-2], h[-1]], dim=1)))


def train_dropout(model: nn.Module) -> nn.Module:
    """eval(), then every dropout on: modules, the attention's and the LSTM's own."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.MultiheadAttention | nn.LSTM):
            m.train()
    return model


def bucket_mix(b: int, length: int, seed: int = 0) -> torch.Tensor:
    """[b, length] ids: three in four texts short (8 to 40 tokens), the rest long (200 to
    length), padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (b, length), generator=g)
    for i in range(b):
        lo, hi = (8, 41) if i % 4 else (min(200, length), length + 1)
        x[i, int(torch.randint(lo, hi, (1,), generator=g)) :] = PAD
    return x


def buckets(args: argparse.Namespace) -> dict[str, float]:
    """Documents/s with length buckets against every text at --length, same weights, one run."""
    from service.training.text_data import train_tokenizer

    tok = train_tokenizer([f"word{i} filler text" for i in range(50)], vocab_size=200)
    b, length = args.batch, args.length
    x = bucket_mix(b, length)
    model = Transformer(length).eval()
    served = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, how in (("buckets", "auto"), ("fixed", None)):
            path = save(
                model, x[:4], out_dir=tmp, name=name, version="1", task="classification",
                intended_use="bench", labels=[str(i) for i in range(5)], tokenizer=tok,
                pad_id=PAD, buckets=how,
            )  # fmt: skip
            served[name] = ServedModel(load_bundle(path))
    text = served["buckets"].manifest.inputs.text
    assert text is not None and text.buckets, "auto chose no buckets for the transformer"
    ids = x.numpy()
    variants = {k: (lambda s=s: s.sample([MCRequest(ids, T, 7)])) for k, s in served.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()  # warm
    for _ in range(args.rounds):
        order = list(variants)
        random.shuffle(order)
        for k in order:
            times[k].append(timed(variants[k]))
    med = {k: median(v) for k, v in times.items()}
    lengths = served["buckets"].buckets.of(ids) if served["buckets"].buckets else []
    return {
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        **{f"{k}_docs_per_s": b / v for k, v in med.items()},
        "buckets_vs_fixed": med["fixed"] / med["buckets"],
        "tokens_buckets": int(sum(lengths)),
        "tokens_fixed": b * length,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--buckets", action="store_true", help="buckets against fixed padding")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.buckets:
        torch.manual_seed(0)
        res = buckets(args)
        print(json.dumps(res, indent=1))
        if args.json:
            report = {
                "machine": machine(), "date": now(), "T": T, "B": args.batch,
                "length": args.length, "rounds": args.rounds,
                "threads": torch.get_num_threads(), "buckets": res,
            }  # fmt: skip
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    torch.manual_seed(0)
    b, length = args.batch, args.length
    tokens = torch.randint(1, VOCAB, (b, length))
    tokens[: b // 2, length // 2 :] = PAD  # half the documents half as long, padded
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("transformer", Transformer), ("lstm", LSTM)):
            model = make(length).eval()
            path = save(
                model, tokens[:4], out_dir=tmp, name=name, version="1",
                task="classification", intended_use="bench", labels=[str(i) for i in range(5)],
            )  # fmt: skip
            served = ServedModel(load_bundle(path))
            tutorial = train_dropout(make(length))
            tutorial.load_state_dict(model.state_dict())
            x = tokens.numpy()

            def loop(m: nn.Module = tutorial) -> None:
                with torch.inference_mode():
                    for _ in range(T):
                        m(tokens)

            def vectorised(m: nn.Module = tutorial) -> None:
                with torch.inference_mode():
                    m(tokens.repeat(T, 1))

            def engine(s: ServedModel = served, ids: object = x) -> None:
                s.sampler.run([MCRequest(ids, T, 7)])  # type: ignore[arg-type]

            variants = {"loop": loop, "vectorised": vectorised, "engine": engine}
            times: dict[str, list[float]] = {k: [] for k in variants}
            engine()  # warm
            for _ in range(args.rounds):
                order = list(variants)
                random.shuffle(order)
                for k in order:
                    times[k].append(timed(variants[k]))
            med = {k: median(v) for k, v in times.items()}
            results[name] = {
                **{f"{k}_ms": 1000 * v for k, v in med.items()},
                **{f"{k}_docs_per_s": b / v for k, v in med.items()},
                "engine_vs_vectorised": med["vectorised"] / med["engine"],
                "engine_vs_loop": med["loop"] / med["engine"],
            }
            print(name, json.dumps(results[name], indent=1))
    report = {
        "machine": machine(), "date": now(), "T": T, "B": b, "length": length,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "results": results,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
