"""Text-model benchmark (issue 20, item 8): documents per second at T = 20 on the CPU.

    python -m bench.text [--rounds 5] [--length 256] [--batch 32] [--profile] [--json FILE]

Models: a 2-layer transformer encoder classifier (d = 128, 4 heads, feed-forward 256, dropout
0.1, learned positions, masked mean pooling) and a 2-layer bidirectional LSTM classifier
(dropout 0.3 between layers and on the last states), both on `--length` tokens.
Variants, interleaved round by round (medians reported):
(a) a Python loop of T forwards with the dropout modules in train mode (torch's own sites: for the
    transformer that is every site, including the attention weights, its encoder layers in train
    mode too, see `train_dropout`; the LSTM's between-layer dropout in its fused kernel);
(b) one vectorised forward of T copies (`x.repeat(T, 1)`, dropout modules in train mode: the
    tutorial's MC dropout), every site as in (a); for the transformer also `vectorised_tutorial`,
    the tutorial's code as usually written, which torch's fused inference path leaves sampling
    the head's site only (the encoder layers in eval mode skip their dropout);
(c) the engine (explicit sites, prefix once per input, fused masks), through a packaged bundle;
(d) the engine sampling only the last k dropout sites (issue 20, item 3; `dropout_sites`): the
    head's site alone (`last1`, the whole encoder in the once-per-input prefix) and, for the
    transformer, its second encoder layer's four sites and the head's (`last5` of 9);
(e) one deterministic forward of the B documents (plain `model.eval()(x)`, torch's fast path).
With --profile, torch.profiler's top operators (self CPU time) of one engine call, every site
sampled, for the transformer: where the sampled part's time goes.

    python -m bench.text --buckets [--rounds 5] [--length 256] [--batch 32] [--json FILE]

Length buckets (issue 20 item 5): the transformer packaged as a text model twice, the same
weights, with buckets ("auto": 16, 32, ... up to --length) and without (every text padded to
--length); documents per second at T = 20 over a mix of three short texts (8 to 40 tokens) to
one long (200 to --length), one request, interleaved rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
from collections.abc import Callable
from typing import Any

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


def train_dropout(model: nn.Module, *, layers: bool = True) -> nn.Module:
    """eval(), then every dropout on: modules, the attention's and the LSTM's own, and the
    encoder layers themselves: an `nn.TransformerEncoderLayer` in eval mode takes torch's fused
    inference path (`_transformer_encoder_layer_fwd`), which applies none of its dropout
    modules, train mode or not. With `layers=False`, the tutorial's code as usually written
    (dropout modules on, the rest eval): on this transformer it samples the head's site only."""
    model.eval()
    kinds: tuple[type[nn.Module], ...] = (nn.Dropout, nn.MultiheadAttention, nn.LSTM)
    if layers:
        kinds += (nn.TransformerEncoderLayer,)
    for m in model.modules():
        if isinstance(m, kinds):
            m.train()
    return model


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant over `rounds` rounds, each round in a random order (so a
    shared machine's slow spells fall on every variant alike)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for k in order:
            times[k].append(timed(variants[k]))
    return {k: median(v) for k, v in times.items()}


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
    for f in variants.values():
        f()  # warm
    med = interleaved(variants, args.rounds)
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
    ap.add_argument("--profile", action="store_true")
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
    profiles: dict[str, dict[str, Any]] = {}
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

            def engine(s: ServedModel = served, ids: object = x, k: int | None = None) -> None:
                s.sampler.run([MCRequest(ids, T, 7, sites=k)])  # type: ignore[arg-type]

            def deterministic(m: nn.Module = model) -> None:
                with torch.inference_mode():
                    m(tokens)

            usual = train_dropout(make(length), layers=False)
            usual.load_state_dict(model.state_dict())

            def vectorised_tutorial(m: nn.Module = usual) -> None:
                with torch.inference_mode():
                    m(tokens.repeat(T, 1))

            variants: dict[str, Callable[[], None]] = {
                "loop": loop, "vectorised": vectorised, "engine": engine,
            }  # fmt: skip
            lasts = (1, 5) if name == "transformer" else (1,)
            for last in lasts:
                variants[f"engine_last{last}"] = functools.partial(engine, k=last)
            variants["deterministic"] = deterministic
            if name == "transformer":
                variants["vectorised_tutorial"] = vectorised_tutorial
            for fn in variants.values():
                if fn not in (loop, vectorised, vectorised_tutorial):
                    fn()  # warm (the splits of the last-k settings are built here)
            med = interleaved(variants, args.rounds)
            results[name] = {
                **{f"{k}_ms": 1000 * v for k, v in med.items()},
                **{f"{k}_docs_per_s": b / v for k, v in med.items()},
                "engine_vs_vectorised": med["vectorised"] / med["engine"],
                "engine_vs_loop": med["loop"] / med["engine"],
                **{f"engine_last{k}_speedup": med["engine"] / med[f"engine_last{k}"]
                   for k in lasts},
                "engine_vs_deterministic": med["engine"] / med["deterministic"],
            }  # fmt: skip
            if name == "transformer":  # both sample the head's site only
                results[name]["engine_last1_vs_vectorised_tutorial"] = (
                    med["vectorised_tutorial"] / med["engine_last1"]
                )
            print(name, json.dumps(results[name], indent=1))
            if args.profile and name == "transformer":
                profiles["engine"] = profile(engine)
                profiles["vectorised"] = profile(vectorised)
    report = {
        "machine": machine(), "date": now(), "T": T, "B": b, "length": length,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "results": results,
        "profiles": profiles,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def profile(fn: Any, top: int = 15) -> dict[str, Any]:
    """torch.profiler's operators of one call by self CPU time (ms and share of the operators'
    total), and the call's wall time: the rest is outside torch's operators (the engine's
    numba mask kernels, Python). Printed too."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = timed(fn)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:top]
    ]
    print(f"profile: {wall * 1000:.0f} ms wall, {total / 1000:.0f} ms in torch operators")
    for r in rows:
        print(f"  {r['op']:<40} {r['self_ms']:9.1f} ms {100 * r['share']:5.1f} % x{r['calls']}")
    return {"wall_ms": wall * 1000, "operators_ms": total / 1000, "top": rows}


if __name__ == "__main__":
    main()
