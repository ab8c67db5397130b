"""Package a user's `nn.Module` into a code-free bundle directory (checked with the engine)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from service.bundle.architecture import describe, rebuild
from service.bundle.fingerprint import sha256_file
from service.bundle.manifest import (
    MANIFEST_NAME,
    Artifact,
    Defaults,
    DropoutLayout,
    LastSites,
    Manifest,
    MCSettings,
    Task,
    Training,
    Variance,
)
from service.bundle.sequence import explicit
from service.bundle.spec import (
    AudioInput,
    InputSpec,
    OutputSpec,
    TextInput,
    WordList,
    distinct,
)
from service.bundle.tokenizer import check_tokenizer_json
from service.bundle.words import dump_words
from service.engine.familiar import familiar_words
from service.engine.graph import find_dropout
from service.engine.onnx_predictor import export_onnx
from service.engine.sampler import MCSampler
from service.errors import ModelError
from service.packaging import destination, sections
from service.packaging.lengths import Buckets, generic_graph
from service.packaging.randomness import check_hidden_dropout
from service.packaging.reproduction import check_mc_pass, check_reproduced
from service.packaging.tracer import trace_with_shapes
from service.packaging.variational import declare

ARCH_FILE = "architecture.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
WORDS_FILE = "words.txt"
# A word is listed when at least this many distinct training texts hold it: the rare words of one
# text (a name, an identifier) never enter the bundle. Texts are not patients: raise it for notes.
WORD_MIN_TEXTS = 2
Role = Literal["architecture", "weights", "onnx", "tokenizer", "words"]


def save(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    out_dir: Path | str,
    name: str,
    version: str,
    task: Task,
    intended_use: str,
    labels: Sequence[str] | None = None,
    target: str | Sequence[str] | None = None,
    target_unit: str | Sequence[str | None] | None = None,
    feature_names: Sequence[str] | None = None,
    units: Sequence[str | None] | None = None,
    valid_ranges: Sequence[tuple[float, float]] | None = None,
    training_ranges: Sequence[tuple[float, float]] | None = None,
    value_range: tuple[float, float] | None = None,
    noise_var: float | None = None,
    variance: Variance | None = None,
    defaults: Defaults | None = None,
    training: Training | None = None,
    extra: dict[str, Any] | None = None,
    tokenizer: Any = None,
    truncation: Literal["truncate", "error"] | None = None,  # a text model's; None: truncate
    pad_id: int | None = None,
    buckets: Buckets = "auto",
    dropout_sites: Literal["all"] | int = "all",
    variational: Sequence[str] | str | None = None,
    training_texts: Sequence[str] | None = None,
    word_min_texts: int = WORD_MIN_TEXTS,
    train_noise: Literal["refuse", "allow"] = "refuse",
    audio: AudioInput | dict[str, Any] | None = None,
) -> Path:
    """Write `<out_dir>/<name>/<version>/` and return it. Refuses a name or version the
    manifest would refuse, and an existing version, before any work; the files are written into
    a hidden directory and renamed into place when complete (destination.py), so a failure
    leaves nothing behind.

    Text models: pass a `tokenizers.Tokenizer` and an example of token ids [B, L]; L becomes the
    maximum number of tokens, texts are padded with `pad_id` (default: the tokenizer's [PAD] or
    <pad>; without either, `pad_id` is required) and longer ones cut or refused (`truncation`).
    `buckets`: the lengths a text is padded to, the smallest that holds it ("auto": powers of
    two from 16, kept only for a model whose answers do not depend on its padding; a list:
    those, trusted; None: always max_tokens), see service.packaging.lengths.py.

    A regressor outputs its mean, with ``noise_var`` (1/tau) as its fixed noise; or, with
    ``variance`` ("log_variance" or "softplus_std"), its mean and then its noise's variance
    parameter, learned per input (a heteroscedastic model, service/engine/heads.py). With k >= 2
    targets, ``target`` is their names and ``target_unit`` their units, in output order: the
    model outputs the k means (then the k variance parameters).

    ``dropout_sites``: the MC passes sample every dropout site ("all", the default) or only the
    last k in graph order (an int; requests may still ask for another setting).

    ``variational``: the dropout sites the model was trained with one mask per sequence, shared
    over time (by their path in the module: an nn.Dropout, your own locked-dropout module with a
    float ``p``, or a stacked LSTM/GRU for its between-layer dropout); their MC masks are then
    shared over time too (service/packaging/variational.py). `service.nn.VariationalDropout` in
    the model needs no declaration. Randomness only train mode has, outside nn.Dropout, is
    refused (randomness.py) unless ``train_noise="allow"`` (noise meant for training only).

    ``training_texts`` (text models): the texts it was trained on. The words found in at least
    ``word_min_texts`` distinct ones are written to words.txt, so that a text mostly made of
    other words is referred once the bundle is calibrated (service/engine/familiar.py); no text
    is stored. Leave it out for no word list (and no such referral).

    ``audio`` (audio models): how the server turns a WAV file into this model's input, log-mel
    features of shape [n_mels, frames] (or [1, n_mels, frames]); train on
    `service.engine.audio.clip_features` of the WAV files, the server's path (docs/BUNDLES.md)."""
    if variance is not None and noise_var:
        raise ModelError(
            "give noise_var (a fixed noise) or variance= (a learned noise head), not both"
        )
    if variance not in (None, "log_variance", "softplus_std"):
        raise ModelError(
            f"variance={variance!r} is not a noise parameterisation; use 'log_variance' "
            "(the head outputs log s^2) or 'softplus_std' (it outputs v with s = softplus(v))"
        )
    if variance is not None and task != "regression":
        raise ModelError("variance= declares a regressor's noise head; a classifier has none")
    if training_texts is not None and tokenizer is None:
        raise ModelError("training_texts= is for text models: pass the tokenizer too")
    if word_min_texts < 1:
        raise ModelError(f"word_min_texts={word_min_texts}: a word needs at least 1 text")
    try:  # before anything is written (the manifest, written last, refuses them too)
        distinct("labels", labels, "each class needs its own label")
        distinct("feature_names", feature_names, "each feature needs its own name")
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    destination.check(name, version)  # before any work: a bad one is refused at once
    dest = Path(out_dir) / name / version
    destination.refuse_existing(dest)
    audio = sections.check_audio(audio, tokenizer, truncation, example_input, value_range)
    tokens = not example_input.dtype.is_floating_point  # integer ids for an embedding
    if tokens:
        sections.check_token_example(module, example_input.dtype, tokenizer is not None)
    example = example_input.detach().to(torch.int64 if tokens else torch.float32)
    if example.dim() < 2:
        raise ModelError("example_input needs a batch dimension: shape [B, *input_shape]")
    if tokenizer is not None:
        if not tokens or example.dim() != 2:
            raise ModelError("a text model's example_input is token ids of shape [B, max_tokens]")
        if pad_id is None:
            found = [tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>")]
            pad_id = next((i for i in found if i is not None), None)
        if pad_id is None:  # 0 was taken: in a byte-level BPE it is "!", masked as padding
            raise ModelError(
                "the tokenizer has no [PAD] or <pad> token: pass pad_id, the id the model pads "
                "with (one no text encodes to)"
            )
    # Sequence layers with hidden dropout made explicit, then traced with the declared shapes
    # (a text model with length buckets: with its length free, see lengths.py).
    plain = explicit(declare(module, variational) if variational else module).eval()
    generic = generic_graph(plain, example, buckets, pad_id or 0) if tokenizer is not None else None
    gm, lengths = generic if generic is not None else (trace_with_shapes(plain, example), None)
    # Functional dropout is visible only now: once exported, it looks like an ordinary op.
    find_dropout(gm)
    desc = describe(gm)
    state = {k: v.detach().contiguous().clone() for k, v in gm.state_dict().items()}
    learned = {name for name, w in gm.named_parameters() if w.requires_grad}  # as load reads
    sections.check_weights(state, learned)  # before the comparison below (NaN fails it vaguely)
    rebuilt = rebuild(
        json.loads(json.dumps(desc)),
        state,
        input_shape=list(example.shape[1:]),
        input_dtype=example.dtype,
    )
    check_reproduced(module, rebuilt, example)  # the module's modes are restored after
    if train_noise == "refuse":  # "allow": training-only noise (augmentation) is meant
        check_hidden_dropout(plain, example)  # train-mode-only dropout the trace left out
    if tokens and value_range is None:  # ids past the vocabulary are refused (422), not a 500
        value_range = (0.0, float(sections.vocabulary(rebuilt) - 1))
    if tokens:
        sections.check_ids(rebuilt, value_range, tokenizer, pad_id)
    sampler = MCSampler(rebuilt, example, device="cpu")
    out_shape = sampler.output_shape
    n_sites = sampler.sites
    if dropout_sites != "all" and (
        isinstance(dropout_sites, bool)
        or not isinstance(dropout_sites, int)
        or not 1 <= dropout_sites <= n_sites
    ):
        raise ModelError(
            f"dropout_sites={dropout_sites!r}: use 'all' or an integer k with 1 <= k <= "
            f"{n_sites} (the last k of the model's {n_sites} dropout sites)"
        )
    if len(out_shape) != 1:
        raise ModelError(f"the model must output [B, outputs], got per-row shape {out_shape}")
    if task == "classification":
        sections.check_classifier(rebuilt, example, labels, out_shape[0])
    elif not target:
        raise ModelError("a regression bundle needs target= (the name of what it predicts)")
    names = [target] if isinstance(target, str) else list(target or [])
    k = len(names)
    if task == "regression" and variance is None and out_shape[0] != k:
        raise ModelError(
            f"a regression model outputs its mean per target: {k} output(s), got {out_shape[0]}; "
            f"a model with a mean and a noise head per target ({2 * k} outputs) also needs "
            "variance='log_variance' or 'softplus_std'"
        )
    if task == "regression" and variance is not None and out_shape[0] != 2 * k:
        raise ModelError(
            f"a model with a learned noise head outputs the means and then the variance "
            f"parameters: {2 * k} outputs for {k} target(s), got {out_shape[0]}"
        )
    outputs = sections.outputs_of(names, target_unit) if task == "regression" else None
    check_mc_pass(sampler, example)  # what would fail every MC request fails here instead

    text, words = None, None
    if tokenizer is not None:
        raw = tokenizer.to_str().encode()
        check_tokenizer_json(raw, "the tokenizer")  # refused now, not when the bundle loads
        text = TextInput(
            tokenizer=TOKENIZER_FILE, max_tokens=int(example.shape[1]),
            truncation=truncation or "truncate",
            pad_id=pad_id or 0, buckets=lengths,
        )  # fmt: skip
        if training_texts is not None:
            words = familiar_words(tokenizer, training_texts, word_min_texts)
            listed = WordList(file=WORDS_FILE, min_texts=word_min_texts, count=len(words))
            text = text.model_copy(update={"words": listed})
    with sections.manifest_errors():  # an invalid section (e.g. a range out of bounds): one line
        fields: dict[str, Any] = dict(
            name=name,
            version=version,
            task=task,
            intended_use=intended_use,
            inputs=InputSpec(
                dtype="int64" if tokens else "float32",
                shape=list(example.shape[1:]),
                feature_names=list(feature_names) if feature_names else None,
                units=list(units) if units else None,
                valid_ranges=[(float(a), float(b)) for a, b in valid_ranges]
                if valid_ranges
                else None,
                training_ranges=[(float(a), float(b)) for a, b in training_ranges]
                if training_ranges
                else None,
                value_range=value_range,
                text=text,
                audio=audio,
            ),
            outputs=outputs or OutputSpec(labels=list(labels) if labels else None),
            aleatoric=sections.aleatoric(noise_var, variance),
            defaults=defaults or Defaults(),
            dropout=[
                DropoutLayout(
                    name=s.name,
                    p=s.rule.p,
                    mask_shape=list(s.mask_shape),
                    shared_over=s.shared_over,
                )
                for s in sampler.graph.sites
            ],
            training=training or Training(),
            mc=None
            if dropout_sites == "all"
            else MCSettings(dropout_sites=LastSites(last=dropout_sites)),
            **(extra or {}),
        )
    # Staged in a hidden directory and renamed into place when complete (destination.py):
    # a failure below leaves nothing, and the registry never sees half a bundle.
    with destination.staged(out_dir, name, version) as work:
        (work / ARCH_FILE).write_text(json.dumps(desc, indent=1, sort_keys=True) + "\n")
        roles: list[tuple[str, Role]] = [
            (ARCH_FILE, "architecture"),
            (WEIGHTS_FILE, "weights"),
            (ONNX_FILE, "onnx"),
        ]
        if text is not None:
            (work / TOKENIZER_FILE).write_bytes(raw)
            roles.append((TOKENIZER_FILE, "tokenizer"))
        if words is not None:
            (work / WORDS_FILE).write_bytes(dump_words(words))
            roles.append((WORDS_FILE, "words"))
        save_file(state, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        # The exporter fixes a recurrent layer's length whatever it is asked (measured: an
        # LSTM's graph came out static, 5 s slower): such a model's deterministic path runs
        # torch per bucket.
        recurrent = any(isinstance(m, nn.LSTM | nn.GRU) for m in rebuilt.modules())
        dynamic = lengths is not None and not recurrent
        export_onnx(rebuilt, example, work / ONNX_FILE, dynamic_length=dynamic)
        for fname in (ARCH_FILE, WEIGHTS_FILE, ONNX_FILE):
            (work / fname).chmod(0o644)  # safetensors writes 0600; a non-root server must read it
        fields["artifacts"] = {
            fname: Artifact(
                sha256=sha256_file(work / fname), size=(work / fname).stat().st_size, role=role
            )
            for fname, role in roles
        }
        with sections.manifest_errors():
            manifest = Manifest(**fields)
        (work / MANIFEST_NAME).write_bytes(manifest.dumps())
    return dest
