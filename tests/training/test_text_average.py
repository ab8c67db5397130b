"""`text_nets.Average` (the medical-abstracts recipe's network): one bundle of several text
networks over one tokenizer, every member's dropout sampled, the mean of their probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.bundle.load import load_bundle
from service.engine.model import ServedModel
from service.engine.sampler import MCRequest
from service.packaging import save
from service.training.text_data import train_tokenizer
from service.training.text_nets import Average, TextNetConfig, build

TEXTS = ["the heart artery failed", "brain seizure in the cortex", "liver and bowel colon"] * 4


def _bundle(tmp_path: Path) -> tuple[Average, Path, np.ndarray]:
    tok = train_tokenizer(TEXTS, 300)
    v = tok.get_vocab_size()
    torch.manual_seed(0)
    cnn = build(TextNetConfig("textcnn", v, 12, 3))
    bag = build(TextNetConfig("fasttext", v, 20, 3))
    net = Average([cnn, bag], [12, None]).eval()
    ids = torch.randint(1, v, (4, 20), generator=torch.Generator().manual_seed(1))
    path = save(
        net, ids, out_dir=tmp_path, name="avg", version="1", task="classification",
        intended_use="test", labels=["a", "b", "c"], tokenizer=tok,
    )  # fmt: skip
    return net, path, ids.numpy()


def test_average_serves_the_mean_of_its_members_probabilities(tmp_path: Path) -> None:
    net, path, ids = _bundle(tmp_path)
    served = ServedModel(load_bundle(path), device="cpu")
    t = torch.as_tensor(ids)
    with torch.inference_mode():
        cnn, bag = net.members
        want = (torch.softmax(cnn(t[:, :12]), -1) + torch.softmax(bag(t), -1)) / 2
    got = served.deterministic(ids)
    assert got.backend == "onnxruntime" and got.point is not None
    np.testing.assert_allclose(got.point, want.numpy(), atol=1e-5)


def test_average_samples_the_dropout_of_every_member(tmp_path: Path) -> None:
    _, path, ids = _bundle(tmp_path)
    served = ServedModel(load_bundle(path), device="cpu")
    sites = [d.name for d in served.manifest.dropout]
    assert sites == ["members.0.emb_drop", "members.0.drop", "members.1.word_drop"]
    logits = served.sampler.run([MCRequest(ids, 8, 0)])[0]
    assert logits.shape == (8, 4, 3) and np.ptp(logits, axis=0).max() > 1e-3
