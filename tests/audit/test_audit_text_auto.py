"""Records of a text model and of `samples: "auto"` replay bit for bit (their answers carry
per-text notes and the passes used, which a replay must give again); a text model's padding is
not stored; the queue and its batches are bounded in bytes as well as records."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import numpy as np
import orjson
import pytest
from audit_support import Backend, execute, serving
from text_nets import LENGTH, save_text_model

from service.audit.arrays import inputs_hmac
from service.audit.replay import opened, replay
from service.bundle.load import TrustPolicy, load_bundle
from service.engine.text import encode_texts

KEY = "text-audit-key"
TEXTS = ["Chest pain", {"text": "acute stroke"}, " ".join(["chest pain"] * LENGTH)]  # last: cut


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("textrepo")
    save_text_model(root)
    return root


def padded_ids(text_repo: Path) -> np.ndarray:
    bundle = load_bundle(text_repo / "notes" / "1", TrustPolicy())
    spec = bundle.manifest.inputs.text
    assert spec is not None
    return encode_texts(TEXTS, bundle.tokenizer, spec, 10).ids


async def record_texts(backend: Backend, text_repo: Path, **settings: object) -> bytes:
    body = {"instances": TEXTS, "parameters": {"samples": 16, "seed": 5}}
    async with serving(text_repo, **backend.settings, **settings) as (app, client):
        r = await client.post("/v1/models/notes:predict", json=body, headers={"X-Request-ID": "t"})
        assert r.status_code == 200, r.text
        assert [p["truncated"] for p in r.json()["predictions"]] == [False, False, True]
        assert await app.state.audit.flush(10)
    return r.content


async def test_text_record_replays_and_keeps_no_padding(backend: Backend, text_repo: Path) -> None:
    answer = await record_texts(backend, text_repo)
    with backend.open() as store:
        [rec] = store.find("t")
    assert rec.summary.encode() == answer
    ids = padded_ids(text_repo)
    assert rec.inputs is not None and rec.inputs.tobytes() == ids.tobytes()  # rebuilt exactly
    stored = execute(backend, "SELECT length(inputs) FROM audit_records")
    kept = sum(min(p["tokens"], LENGTH) for p in orjson.loads(answer)["predictions"])
    assert stored == 8 * kept < ids.nbytes  # the ids before the padding, int64
    result = replay(rec, text_repo)  # was: "$.predictions[0].tokens: present in only one"
    assert result.identical, result.differences


async def test_text_record_replays_from_the_texts_in_hmac_mode(
    backend: Backend, text_repo: Path, tmp_path: Path
) -> None:
    await record_texts(backend, text_repo, audit_inputs="hmac", audit_hmac_key=KEY)
    with backend.open() as store:
        [rec] = store.find("t")
    assert rec.inputs is None
    assert rec.inputs_hmac == inputs_hmac(KEY.encode(), padded_ids(text_repo))  # of the engine's
    texts = tmp_path / "texts.json"
    texts.write_bytes(orjson.dumps({"instances": TEXTS}))
    # was: "instance 0 is the string 'Chest pain', not an array"
    result = replay(rec, text_repo, inputs=texts, hmac_key=KEY.encode())
    assert result.identical, result.differences


async def test_auto_record_replays_with_its_settings(backend: Backend, repo: Path) -> None:
    requests = {
        "auto": {"samples": "auto", "seed": 5},
        "auto-set": {"samples": "auto", "seed": 6, "max_samples": 64, "tolerance": 0.2},
    }
    async with serving(repo, **backend.settings) as (app, client):
        for rid, params in requests.items():
            body = {"instances": [[0.1, 0.2, 0.3, 0.4], [2, -1, 0, 1]], "parameters": params}
            r = await client.post(
                "/v1/models/clf:predict", json=body, headers={"X-Request-ID": rid}
            )
            assert r.status_code == 200, r.text
        assert await app.state.audit.flush(10)
        records = {rid: app.state.audit.store.find(rid)[0] for rid in requests}
    assert records["auto"].params["auto"] == {"max_samples": 1000, "tolerance": 0.01, "first": 32}
    assert records["auto-set"].params["auto"]["max_samples"] == 64
    for rid, rec in records.items():
        result = replay(rec, repo)  # was: "$.predictions[0].passes_used: present in only one"
        assert result.identical, (rid, result.differences)
    # A record from before the settings were kept: read from its answer's warning, it replays
    # bit for bit too (it was DIFFERENT: "passes_used: present in only one"; review R12).
    old = records["auto-set"]
    old = dataclasses.replace(old, params={k: v for k, v in old.params.items() if k != "auto"})
    result = replay(old, repo)
    assert result.identical, result.differences


async def test_queue_and_batches_are_bounded_in_bytes(tmp_path: Path, text_repo: Path) -> None:
    db = tmp_path / "a.db"
    body = {"instances": TEXTS, "parameters": {"samples": 16, "seed": 5}}
    url = "/v1/models/notes:predict"
    async with serving(text_repo, audit_path=db) as (app, client):
        writer = app.state.audit
        writer.batch_bytes = 1  # every batch one record (it takes one at least)
        rs = [await client.post(url, json=body) for _ in range(3)]
        assert [r.status_code for r in rs] == [200] * 3
        assert await writer.flush(10)
        assert writer.stats.batches == 3 and writer.stats.written == 3
        lock = sqlite3.connect(db, isolation_level=None)  # the store is down: records wait
        lock.execute("BEGIN EXCLUSIVE")
        try:
            assert (await client.post(url, json=body)).status_code == 200
            assert writer.depth_bytes > len(rs[0].content)  # its answer and more
            writer.queue_bytes = 2 * writer.depth_bytes - 1  # no room for a second one
            metrics = (await client.get("/metrics")).text
            assert f"mcserve_audit_queue_bytes {float(writer.depth_bytes)}" in metrics
            refused = await client.post(url, json=body)
            assert refused.status_code == 503
            assert refused.json()["error"].startswith("the audit queue is full (")
            assert "its byte bound" in refused.json()["error"]
            assert (await client.get("/readyz")).status_code == 503  # the queue is full
        finally:
            lock.execute("COMMIT")
            lock.close()
        assert await writer.flush(10)
        assert writer.store.count() == 4 and writer.depth_bytes == 0


def test_an_auto_record_replays_at_its_own_passes_whatever_the_rule_today() -> None:
    """A replay decided again when to stop, so a record answered under an earlier stopping rule
    (2026-12-06: a classifier started at 32 passes, one answered at 64) replayed DIFFERENT at
    today's 100 (review R11). It replays at the passes it used: the same bits."""
    from service.audit.replay import _predict
    from service.engine.model import ServedModel
    from service.engine.params import PredictParams

    root = Path(__file__).resolve().parents[2]
    model = ServedModel(load_bundle(root / "models" / "breast-cancer" / "2"), device="cpu")
    x = np.loadtxt(root / "models" / "data" / "breast-cancer-test.csv", delimiter=",",
                   skiprows=1)[:1, :30].astype(np.float32)  # fmt: skip
    auto = {"max_samples": 1000, "tolerance": 0.01, "first": 32}
    recorded = {"samples": 64, "confidence": [0.95], "seed": 3, "mode": "mc",
                "interval": "quantile", "auto": auto}  # fmt: skip
    again = _predict(model, x, recorded)
    fixed = model.predict(x, PredictParams(64, (0.95,), seed=3, interval="quantile"))
    assert again.samples == 64 and again.adaptive
    assert again.summary.probabilities.tobytes() == fixed.summary.probabilities.tobytes()


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text model whose tokenizer puts [CLS] ... [SEP] around a text."""
    import torch
    from text_nets import CORPUS, VOCAB, TextCNN, token_batch
    from tokenizers import processors

    from service.packaging import save
    from service.training.text_data import train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=VOCAB - 2)
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    cls_, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert max(cls_, sep) < VOCAB
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_), ("[SEP]", sep)]
    )
    root = tmp_path_factory.mktemp("templaterepo")
    torch.manual_seed(0)
    save(TextCNN().eval(), token_batch(), out_dir=root, name="notes", version="1",
         task="classification", intended_use="tests only", labels=["a", "b", "c"],
         tokenizer=tok)  # fmt: skip
    return root


async def test_an_hmac_record_of_the_old_cut_replays_from_its_texts(
    backend: Backend, template_repo: Path, tmp_path: Path
) -> None:
    """Before 2026-12-07 a long text was cut without its template's closing [SEP]; a record of
    then holds the HMAC of those ids, and its texts (tokenized with today's cut) were refused
    as "not the inputs of this prediction". They replay, with a note."""
    await record_texts(backend, template_repo, audit_inputs="hmac", audit_hmac_key=KEY)
    with backend.open() as store:
        [rec] = store.find("t")
    key = KEY.encode()
    bundle = load_bundle(template_repo / "notes" / "1", TrustPolicy())
    spec = bundle.manifest.inputs.text
    assert spec is not None
    new = encode_texts(TEXTS, bundle.tokenizer, spec, 10).ids
    old = encode_texts(TEXTS, bundle.tokenizer, spec, 10, plain_cut=True).ids
    assert not np.array_equal(new, old) and np.array_equal(new[:2], old[:2])  # the cut text
    # The record as the server of then wrote it: the old ids' HMAC and their answer (opened:
    # the answer is sealed under the key, and a replay opens it first).
    then = dataclasses.replace(opened(rec, key), inputs_hmac=inputs_hmac(key, old))
    answered = replay(then, template_repo, inputs=old, hmac_key=key).recomputed
    then = dataclasses.replace(then, summary=answered)
    texts = tmp_path / "texts.json"
    texts.write_bytes(orjson.dumps({"instances": TEXTS}))
    result = replay(then, template_repo, inputs=texts, hmac_key=key)
    assert result.identical, result.differences
    assert any("before 2026-12-07" in n for n in result.notes), result.notes
    now = replay(rec, template_repo, inputs=texts, hmac_key=key)  # today's records: no note
    assert now.identical and not any("before 2026-12-07" in n for n in now.notes)
