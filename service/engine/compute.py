"""The work of one batch: one shared MC forward, grouped summaries, deterministic calls.

Pure: it reads the model and the requests' inputs and parameters, nothing of the batcher's queue,
so the same function runs on the server's compute thread or in the compute process
(`worker.py`), and gives the same numbers in both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from service.engine import adaptive
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.engine.prediction import split
from service.engine.sampler import MCRequest
from service.errors import CancelledError, DeadlineExceededError

log = logging.getLogger("mcserve.batcher")
# Said whether or not a chunk of its own was skipped (its batch may have run past it), and for
# every route: /v1's timeout_ms, /v2's timeout, the CDS deadline the server sets.
STOPPED = (
    "the request's deadline passed during the compute of its batch; its answer was dropped and "
    "what was left of its compute skipped"
)
GONE = "the client disconnected during the compute; what was left of it was skipped"


@dataclass(frozen=True)
class More:
    """An adaptive request (samples="auto") that is not settled yet: queue it again with
    `samples` passes (its seed unchanged, so the next chunk repeats these passes and adds more)."""

    samples: int


@dataclass(frozen=True)
class Part:
    """A turn of a longer request (turns.py): its samples [passes, B, ...], not summarised."""

    samples: np.ndarray


Outcome = Prediction | BaseException | More | Part


@dataclass(frozen=True)
class Work:
    """One request, as the compute sees it. A turn of a longer request (turns.py) runs the
    passes `req` names; `part`: return them as they are (a Part), else summarise them after
    `prior`, the samples of its earlier turns."""

    x: np.ndarray
    params: PredictParams
    req: MCRequest | None  # None: deterministic mode
    prior: np.ndarray | None = None
    part: bool = False


def run(model: ServedModel, works: list[Work]) -> list[Outcome]:
    """One shared MC forward over every MC request, one deterministic call per other request.
    A failure is returned in its request's place (never raised), so it fails that one only."""
    out: list[Outcome | None] = [None] * len(works)
    mc = [(k, w) for k, w in enumerate(works) if w.req is not None]
    if mc:
        reqs = [w.req for _, w in mc if w.req is not None]
        samples: list[np.ndarray | BaseException]
        try:
            samples = list(model.sample(reqs))
        except Exception:
            # Isolate the failure: rerun one by one so only the bad request fails.
            samples = [_one(model, r) for r in reqs]
        good = []
        now = time.monotonic()
        for (k, w), smp in zip(mc, samples, strict=True):
            if isinstance(smp, BaseException):
                out[k] = smp
                continue
            stop = _stopped(w.req, now)
            if stop is not None:
                out[k] = stop  # its skipped rows are NaN
                continue
            if w.part:
                out[k] = Part(smp)
                continue
            if w.prior is not None:
                smp = np.concatenate([w.prior, smp])
            more = _more(model, smp, w)
            if more is not None:
                out[k] = more
            else:
                good.append((k, w, smp))
        for group in _groups(model, good):
            for k, res in _summarize_group(model, group):
                auto = works[k].params.auto
                out[k] = adaptive.mark(res, auto) if auto and isinstance(res, Prediction) else res
    for k, w in enumerate(works):
        if w.req is None:
            try:
                out[k] = model.deterministic(w.x)
            except Exception as exc:
                out[k] = exc
    return [o if o is not None else RuntimeError("no result") for o in out]


def _stopped(req: MCRequest | None, now: float) -> BaseException | None:
    """Why a request's samples are not to be summarised: its deadline passed or its client
    went during the compute (both skip its remaining chunks), else None."""
    if req is None:
        return None
    if req.deadline is not None and now >= req.deadline:
        return DeadlineExceededError(STOPPED)
    if req.cancel is not None and req.cancel.is_set():
        return CancelledError(GONE)
    return None


def _more(model: ServedModel, samples: np.ndarray, w: Work) -> Outcome | None:
    """An adaptive request's next step: None when done (its answer is this chunk's, summarised
    like any fixed request at these passes), else More or its failure."""
    if w.params.auto is None:
        return None
    try:
        more = adaptive.next_passes(model, samples, w.params, w.params.auto)
    except Exception as exc:  # delivered to this request's future only
        return exc
    return More(more) if more is not None else None


def warm(model: ServedModel) -> None:
    """One MC and one deterministic call: first-call costs never land on a client."""
    x = np.zeros((1, *model.manifest.inputs.shape), dtype=np.float32)
    text = model.manifest.inputs.text
    if text is not None:  # one text per length (bucket), each filling it: never all padding,
        # which a model that masks its padding answers with NaN (no token to attend to)
        lengths = text.lengths
        x = np.full((len(lengths), text.max_tokens), text.pad_id, dtype=np.int64)
        for i, n in enumerate(lengths):
            x[i, :n] = 1 if text.pad_id != 1 else 2
    samples = model.manifest.defaults.samples
    model.predict(x, PredictParams(samples=samples, confidence=(0.9,), seed=0))
    model.predict(x, PredictParams(samples=2, confidence=(0.9,), mode="deterministic"))


def _one(model: ServedModel, req: MCRequest) -> np.ndarray | BaseException:
    try:
        return model.sample([req])[0]
    except Exception as exc:
        return exc


Entry = tuple[int, Work, np.ndarray]


def _groups(model: ServedModel, items: list[Entry]) -> list[list[Entry]]:
    """Requests whose summaries can be computed as one: same passes, levels and method.

    One numpy call over many requests costs about what one request costs (measured: the
    per-request summary was half of the compute thread's time at concurrency 64). Reductions
    run along the passes axis, so each input's numbers do not depend on its neighbours.
    """
    groups: dict[tuple[object, ...], list[Entry]] = {}
    regression = model.manifest.task == "regression"
    for entry in items:
        w = entry[1]
        p = w.params
        assert w.req is not None
        # Sampled noise (quantile intervals of a regressor) draws from the request's own seed,
        # input after input: in a group, a request would get the draws of the group's inputs
        # before it (two requests with seed 42 answered differently together than alone).
        alone = entry[0] if regression and p.interval == "quantile" else None
        key = (p.samples, p.confidence, p.interval, alone, w.req.sites)  # sites: named in answers
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _summarize_group(model: ServedModel, group: list[Entry]) -> list[tuple[int, Outcome]]:
    first = group[0][1]
    assert first.req is not None
    if len(group) == 1:  # nothing to share: summarise it whole, no slicing (low load)
        k, w, smp = group[0]
        return [(k, _summarize(model, smp, w))]
    try:
        stacked = np.concatenate([smp for _, _, smp in group], axis=1)
        inputs = np.concatenate([w.x for _, w, _ in group])
        joint = dataclasses.replace(first.req, x=inputs)
        whole = model.summarize(stacked, joint, first.params)
    except Exception:
        log.warning("grouped summary failed; summarising one by one", exc_info=True)
        # Isolate: summarise one by one so only the failing request fails.
        return [(k, _summarize(model, smp, w)) for k, w, smp in group]
    sizes = [int(smp.shape[1]) for _, _, smp in group]
    seeds = [w.req.seed for _, w, _ in group if w.req is not None]
    preds = split(whole, sizes, seeds)
    return [(k, p) for (k, _, _), p in zip(group, preds, strict=True)]


def _summarize(model: ServedModel, samples: np.ndarray, w: Work) -> Outcome:
    assert w.req is not None
    try:
        return model.summarize(samples, w.req, w.params)
    except Exception as exc:  # delivered to this request's future only
        return exc
