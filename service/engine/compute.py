"""The work of one batch: one shared MC forward, grouped summaries, deterministic calls.

Pure: it reads the model and the requests' inputs and parameters, nothing of the batcher's queue,
so the same function runs on the server's compute thread or in the compute process
(`worker.py`), and gives the same numbers in both.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from service.engine.model import Prediction, PredictParams, ServedModel
from service.engine.sampler import MCRequest
from service.engine.slicing import split

log = logging.getLogger("mcserve.batcher")
Outcome = Prediction | BaseException


@dataclass(frozen=True)
class Work:
    """One request, as the compute sees it."""

    x: np.ndarray
    params: PredictParams
    req: MCRequest | None  # None: deterministic mode


def run(model: ServedModel, works: list[Work]) -> list[Outcome]:
    """One shared MC forward over every MC request, one deterministic call per other request.
    A failure is returned in its request's place (never raised), so it fails that one only."""
    out: list[Outcome | None] = [None] * len(works)
    mc = [(k, w) for k, w in enumerate(works) if w.req is not None]
    if mc:
        reqs = [w.req for _, w in mc if w.req is not None]
        samples: list[np.ndarray | BaseException]
        try:
            samples = list(model.sampler.run(reqs))
        except Exception:
            # Isolate the failure: rerun one by one so only the bad request fails.
            samples = [_one(model, r) for r in reqs]
        good = []
        for (k, w), smp in zip(mc, samples, strict=True):
            if isinstance(smp, BaseException):
                out[k] = smp
            else:
                good.append((k, w, smp))
        for group in _groups(model, good):
            for k, res in _summarize_group(model, group):
                out[k] = res
    for k, w in enumerate(works):
        if w.req is None:
            try:
                out[k] = model.deterministic(w.x)
            except Exception as exc:
                out[k] = exc
    return [o if o is not None else RuntimeError("no result") for o in out]


def warm(model: ServedModel) -> None:
    """One MC and one deterministic call: first-call costs never land on a client."""
    x = np.zeros((1, *model.manifest.inputs.shape), dtype=np.float32)
    samples = model.manifest.defaults.samples
    model.predict(x, PredictParams(samples=samples, confidence=(0.9,), seed=0))
    model.predict(x, PredictParams(samples=2, confidence=(0.9,), mode="deterministic"))


def _one(model: ServedModel, req: MCRequest) -> np.ndarray | BaseException:
    try:
        return model.sampler.run([req])[0]
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
        # Sampled noise (quantile intervals of a regressor) draws from the request's seed.
        own_rng = regression and p.interval == "quantile"
        seed = w.req.seed if own_rng else None
        key = (p.samples, p.confidence, p.interval, seed, w.req.sites)  # sites: named in answers
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
