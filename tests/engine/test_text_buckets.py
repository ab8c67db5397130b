"""Length buckets for text models (issue 20 item 5): a text runs padded to the bucket its own
token count picks, so its samples are the same bits alone, among longer texts and replayed; the
batcher counts tokens and serves short texts between long ones."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from text_nets import CORPUS, PAD, LSTMClassifier, TextCNN, TransformerClassifier, wordpiece
from torch import nn

from service.bundle.load import load_bundle
from service.bundle.sequence import explicit
from service.engine.batcher import Batcher
from service.engine.buckets import row_lengths
from service.engine.compute import warm
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest
from service.errors import BundleError, OverloadedError
from service.packaging import save
from service.packaging.lengths import generic_graph

MAX = 64
MODELS = {
    "transformer": lambda: TransformerClassifier(length=MAX),
    "lstm": LSTMClassifier,
    "textcnn": TextCNN,
}


def texts(*lengths: int, seed: int = 0) -> np.ndarray:
    """Ids [len(lengths), MAX]: row i has lengths[i] real tokens, then padding."""
    g = np.random.default_rng(seed)
    x = np.full((len(lengths), MAX), PAD, dtype=np.int64)
    for i, n in enumerate(lengths):
        x[i, :n] = g.integers(1, 100, n)
    return x


def _save(tmp: Path, name: str, make: nn.Module, buckets: object) -> Path:
    torch.manual_seed(0)
    example = torch.as_tensor(texts(MAX, 40, 9, 20))
    return save(
        make.eval(), example, out_dir=tmp, name=name, version="1", task="classification",
        intended_use="tests only", labels=["a", "b", "c"], tokenizer=wordpiece(CORPUS),
        buckets=buckets,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    """The three issue-20 models with buckets 16, 32, 64 (the transformer's chosen by "auto";
    the LSTM and the CNN read their padding, so theirs are asked for explicitly)."""
    tmp = tmp_path_factory.mktemp("buckets")
    out = {}
    for name, make in MODELS.items():
        buckets = "auto" if name == "transformer" else [16, 32]
        out[name] = ServedModel(load_bundle(_save(tmp, name, make(), buckets)), device="cpu")
    return out


def test_a_rows_length_is_read_from_the_row_alone() -> None:
    x = texts(3, 64, 17, 16)
    x[0, 1] = PAD  # padding inside a text does not end it
    assert row_lengths(x, PAD).tolist() == [3, 64, 17, 16]


def test_buckets_chosen_at_packaging(served: dict[str, ServedModel]) -> None:
    for m in served.values():
        text = m.manifest.inputs.text
        assert text is not None and text.buckets == [16, 32, 64]
        assert sorted(m.samplers) == [16, 32, 64]


def test_auto_keeps_one_length_for_a_model_that_reads_its_padding() -> None:
    # The LSTM's last state runs over the padding: padded to 16 or to 64 it answers differently.
    # The transformer masks it (attention) and pools over real tokens only.
    # (The fixture's transformer got its buckets from "auto", the LSTM's were asked for.)
    torch.manual_seed(0)
    module = explicit(LSTMClassifier().eval()).eval()
    assert generic_graph(module, torch.as_tensor(texts(MAX, 40)), "auto", PAD) is None


@pytest.mark.parametrize("name", list(MODELS))
def test_samples_alone_among_longer_texts_and_replayed(
    name: str, served: dict[str, ServedModel]
) -> None:
    model = served[name]
    short, mid = texts(9, seed=1), texts(27, seed=2)
    alone = [model.sample([MCRequest(x, 12, 7)])[0] for x in (short, mid)]
    longer = MCRequest(texts(64, 50, seed=3), 12, 8)
    mixed = MCRequest(np.concatenate([texts(60, seed=4), short, mid]), 12, 7, index=None)
    shared = model.sample([longer, MCRequest(short, 12, 7), MCRequest(mid, 12, 7), mixed])
    replay = model.sample([MCRequest(short, 12, 7)])[0]
    assert shared[1].tobytes() == alone[0].tobytes() == replay.tobytes()
    assert shared[2].tobytes() == alone[1].tobytes()
    # Within a request a text keeps its own place's masks, whatever the other texts' lengths:
    # the same texts after another first text give the same bits.
    other = MCRequest(np.concatenate([texts(12, seed=5), short, mid]), 12, 7)
    again = model.sample([other])[0]
    assert again[:, 1:].tobytes() == shared[3][:, 1:].tobytes()
    assert not np.array_equal(alone[0], shared[3][:, 1:2])  # its place (row 1) keys its masks


@pytest.mark.parametrize("sites", [1, 3])
def test_a_dropout_site_setting_keeps_its_bits_across_buckets(
    served: dict[str, ServedModel], sites: int
) -> None:
    """The last k sites (issue 20 item 3) at each bucket's length: alone, among longer texts
    and other settings, replayed: the same bits; another setting, other samples."""
    model = served["transformer"]
    short = texts(9, seed=1)
    alone = model.sample([MCRequest(short, 12, 7, sites=sites)])[0]
    shared = model.sample(
        [
            MCRequest(texts(64, 50, seed=3), 12, 8, sites=sites),
            MCRequest(short, 12, 7, sites=sites),
            MCRequest(texts(40, seed=6), 12, 7),  # every site, in the same batch
        ]
    )
    assert shared[1].tobytes() == alone.tobytes()
    assert model.sample([MCRequest(short, 12, 7, sites=sites)])[0].tobytes() == alone.tobytes()
    assert not np.array_equal(alone, model.sample([MCRequest(short, 12, 7)])[0])


def test_a_short_text_runs_at_its_own_bucket_in_a_batch_of_long_ones(
    served: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = served["transformer"]
    seen: list[tuple[int, ...]] = []
    for sampler in model.samplers.values():
        run = sampler.run

        def spy(reqs: list[MCRequest], run: object = run) -> list[np.ndarray]:
            seen.extend(tuple(r.x.shape) for r in reqs)
            return run(reqs)  # type: ignore[operator]

        monkeypatch.setattr(sampler, "run", spy)
    model.sample([MCRequest(texts(64, 33), 4, 1), MCRequest(texts(5, 20), 4, 2)])
    # 64 and 33 tokens run at 64 (one forward), 5 at 16 and 20 at 32: never at the batch's 64.
    assert sorted(seen) == [(1, 16), (1, 32), (2, 64)]


def test_padding_mask_makes_the_bucket_invisible(served: dict[str, ServedModel]) -> None:
    # The transformer masks its padding and pools over real tokens: a text at its bucket answers
    # as the same text padded to max_tokens (dropout off), to float rounding.
    model = served["transformer"]
    x = texts(5, 16, 17, 40, seed=6)
    by_bucket = model.deterministic(x).point  # ONNX, each text cut to its bucket
    full_point = model.sampler.deterministic(x)  # torch, every text at max_tokens
    assert by_bucket is not None
    z = full_point - full_point.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(by_bucket, probs, rtol=1e-4, atol=1e-5)


def test_onnx_has_a_dynamic_sequence_axis_matching_torch(served: dict[str, ServedModel]) -> None:
    model = served["transformer"]
    assert model.onnx is not None and model.onnx.dynamic_length
    x = texts(12, 30, seed=7)
    for n in (16, 32):
        want = model.samplers[n].deterministic(x[:, :n])
        np.testing.assert_allclose(model.onnx.predict(x[:, :n]), want, rtol=1e-4, atol=1e-5)


def test_cost_counts_tokens_at_bucket_length(served: dict[str, ServedModel]) -> None:
    model = served["textcnn"]
    assert model.cost_unit == MAX
    assert model.cost(texts(3, 20, 64), 10) == 10 * (16 + 32 + 64)
    assert model.length_class(texts(3, 20)) == 32


def test_buckets_for_a_graph_traced_at_one_length_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, "fixed", TransformerClassifier(length=MAX), None)
    mf = path / "manifest.json"
    doc = json.loads(mf.read_text())
    assert doc["inputs"]["text"].get("buckets") is None
    doc["inputs"]["text"]["buckets"] = [16, 64]
    mf.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="bucket length 16"):
        ServedModel(load_bundle(path), device="cpu")


async def test_a_short_text_is_served_before_the_long_queue_drains(
    served: dict[str, ServedModel],
) -> None:
    """Eight long texts queue behind a busy worker, then one short: it is answered second, not
    ninth (FIFO). Each long request fills a batch's token budget, so order = batches."""
    model = served["textcnn"]
    executor = ThreadPoolExecutor(1)
    gate = threading.Event()
    busy = executor.submit(gate.wait)
    batcher = Batcher(model, executor, max_batch_rows=10)  # 10 rows of 64 tokens per batch
    batcher.start()
    done: list[str] = []
    params = PredictParams(samples=10, confidence=(0.9,), seed=1)
    futs = []
    for i in range(8):
        fut = batcher.enqueue(texts(60, seed=i), params)
        fut.add_done_callback(lambda _f, i=i: done.append(f"long{i}"))
        futs.append(fut)
        await asyncio.sleep(0)
    short = batcher.enqueue(texts(6), params)
    short.add_done_callback(lambda _f: done.append("short"))
    await asyncio.sleep(0.01)
    # The queue gauge's rows are rows at full size, as the batches' (it showed 64 x as many:
    # tokens): 8 x 10 passes of full-length texts and 10 of a short one.
    assert 80 < batcher.queued_rows <= 90, batcher.queued_rows
    gate.set()
    busy.result()
    await asyncio.gather(*futs, short)
    await batcher.stop()
    executor.shutdown()
    assert done.index("short") <= 1, done
    assert max(batcher.stats.batch_rows) == 10  # a long request: 10 passes x 64 tokens


def test_warm_up_without_buckets_reads_tokens_not_padding(tmp_path: Path) -> None:
    """Warm-up ran a text model without buckets on a row of padding alone: a transformer that
    masks its padding answers NaN there, and the server refused to start (or the model)."""
    model = ServedModel(
        load_bundle(_save(tmp_path, "t", MODELS["transformer"](), None)), device="cpu"
    )
    assert model.buckets is None
    warm(model)  # raised SummaryError: logits contain NaN


async def test_the_room_check_before_tokenizing_counts_the_shortest_bucket(
    served: dict[str, ServedModel],
) -> None:
    """A full queue refuses a request before its texts are tokenized (`check_room`), at its
    least cost: every text in the shortest bucket. Counted at full length, two short texts
    that the queue can take were refused."""
    model = served["textcnn"]
    executor = ThreadPoolExecutor(1)
    gate = threading.Event()
    busy = executor.submit(gate.wait)
    params = PredictParams(samples=10, confidence=(0.9,), seed=1)
    # Room for 25 passes at full length (1,600 tokens); one long text's 10 passes take 640.
    batcher = Batcher(model, executor, max_queue_rows=25)
    batcher.start()
    try:
        long = batcher.enqueue(texts(60), params)
        batcher.check_room(2, params)  # 2 x 10 x 16 tokens fit beside it: not refused
        short = batcher.enqueue(texts(6, 9), params)  # two texts in the 16 bucket: 320
        batcher.check_room(4, params)  # 4 x 10 x 16 more still fit (640 + 320 + 640 = 1,600)
        with pytest.raises(OverloadedError):
            batcher.check_room(7, params)  # 7 x 10 x 16 = 1,120 at the least: no room
        assert batcher.stats.rejected == 1
    finally:
        gate.set()
        busy.result()
    await asyncio.gather(long, short)
    await batcher.stop()
    executor.shutdown()
