"""Prometheus metrics (prometheus-client), one registry per app.

Labels only take known values: a model label is a loaded model's name or "(unknown)", a route
label is the route template, so a client cannot create series by sending made-up names. Names
follow Triton's facts under the service's own prefix (requests, queue and compute durations,
batch sizes), plus the served uncertainty so that drift is visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from service.engine.model import Prediction
from service.engine.prediction import source
from service.engine.summaries import ClassificationSummary, RegressionSummary

UNKNOWN = "(unknown)"
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROWS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
# Why the connection layer closed a connection (connections.py), each shown from 0.
REASONS = frozenset({"body_timeout", "concurrency", "evicted", "header_timeout", "refused"})
UNCERTAINTY = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


class Metrics:
    def __init__(self, created: bool = False) -> None:
        # No `_created` sample beside every counter and histogram unless asked (setting
        # metrics_created): it doubled the series, and Prometheus derives resets from the
        # values. prometheus-client's switch is process-wide.
        (enable_created_metrics if created else disable_created_metrics)()
        r = self.registry = CollectorRegistry()
        self.known: set[str] = set()
        # Each served version's queue, summed per model name (the gauge's one label): binding
        # the name to the last version attached hid the others' queues and, after an unload,
        # kept a retired batcher (and its model) alive.
        # name -> (version, digest) -> rows: a version moved on disk with new files is attached
        # before the old copy is freed, under the same version (its removal took the new one's).
        self._queues: dict[str, dict[tuple[str, str], Callable[[], float]]] = {}
        # Labelled children by (metric, labels): `labels()` checks and converts every value
        # under a lock, 25 us of the event loop per prediction (py-spy at concurrency 64).
        # Bounded: every label takes known values only (see above).
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "mcserve_requests",
            "HTTP requests by model, route and status",
            ["model", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mcserve_request_duration_seconds",
            "Total time in the server",
            ["model", "route"],
            buckets=LATENCY,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "mcserve_queue_duration_seconds",
            "Time from queueing to the start of compute",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "mcserve_compute_duration_seconds",
            "Compute time of the batch a request ran in",
            ["model"],
            buckets=LATENCY,
            registry=r,
        )
        self.featurise_seconds = Histogram(
            "mcserve_featurise_duration_seconds",
            "Time turning a request's inputs into the model's tensor (WAV files decoded and "
            "their features computed, texts tokenized, numbers converted)",
            ["model", "input"],
            buckets=LATENCY,
            registry=r,
        )
        self.batch_rows = Histogram(
            "mcserve_batch_rows",
            "Rows (inputs x passes) per batch",
            ["model"],
            buckets=ROWS,
            registry=r,
        )
        self.queue_rows = Gauge(
            "mcserve_queue_rows", "Rows queued or computing", ["model"], registry=r
        )
        self.passes = Counter(
            "mcserve_passes", "MC passes answered with (per input)", ["model"], registry=r
        )
        self.predictions = Counter(
            "mcserve_predictions", "Inputs answered", ["model", "mode"], registry=r
        )
        self.referrals = Counter(
            "mcserve_referrals", "Inputs flagged for a human", ["model"], registry=r
        )
        self.epistemic_std = Histogram(
            "mcserve_epistemic_std",
            "Served epistemic std (regressors)",
            ["model"],
            buckets=UNCERTAINTY,
            registry=r,
        )
        self.mutual_information = Histogram(
            "mcserve_mutual_information",
            "Served mutual information (classifiers)",
            ["model"],
            buckets=UNCERTAINTY,
            registry=r,
        )
        self.model_info = Gauge(
            "mcserve_model_info",
            "Loaded model versions (value 1)",
            ["model", "version", "digest", "backend", "device"],
            registry=r,
        )
        self.internal_errors = Counter(
            "mcserve_internal_errors",
            "Unexpected exceptions answered with 500",
            ["route"],
            registry=r,
        )

    def _child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model(self, name: str | None) -> str:
        return name if name in self.known else UNKNOWN

    def watch_connections(self, closed: Mapping[str, int]) -> None:
        """Export what the connection layer answered or closed below the app (connections.py:
        408s, evictions, uvicorn's 503 at max_concurrency): requests_total never sees them."""
        self.registry.register(_Closed(closed))

    def watch_bodies(self, budget: _Budget) -> None:
        """Export the body bytes requests in flight hold against their server-wide limit, and
        the requests refused at it (api/common/inflight.py; they are 429s in requests_total)."""
        self.registry.register(_Bodies(budget))

    def add_model(
        self,
        name: str,
        version: str,
        digest: str,
        backend: str,
        device: str,
        queue_rows: Callable[[], float],
    ) -> None:
        self.known.add(name)
        self.model_info.labels(name, version, digest, backend, device).set(1)
        queues = self._queues.setdefault(name, {})
        queues[(version, digest)] = queue_rows
        self.queue_rows.labels(name).set_function(lambda: sum(q() for q in queues.values()))

    def remove_model(self, name: str, version: str, digest: str, backend: str, device: str) -> None:
        with contextlib.suppress(KeyError):
            self.model_info.remove(name, version, digest, backend, device)
        queues = self._queues.get(name, {})
        queues.pop((version, digest), None)
        if not queues:
            self._queues.pop(name, None)
            with contextlib.suppress(KeyError):
                self.queue_rows.remove(name)

    def observe_request(self, model: str | None, route: str, status: int, seconds: float) -> None:
        m = self.model(model)
        self._child(self.requests, m, route, str(status)).inc()
        self._child(self.request_seconds, m, route).observe(seconds)
        if status == 500:
            self._child(self.internal_errors, route).inc()

    def observe_featurise(self, model: str, kind: str, seconds: float) -> None:
        self._child(self.featurise_seconds, self.model(model), kind).observe(seconds)

    def observe_batch(self, model: str, rows: int, seconds: float) -> None:
        self._child(self.batch_rows, self.model(model)).observe(rows)

    def observe_result(self, model: str, pred: Prediction, inputs: int) -> None:
        m = self.model(model)
        if "queue_s" in pred.timing:
            self._child(self.queue_seconds, m).observe(pred.timing["queue_s"])
            self._child(self.compute_seconds, m).observe(pred.timing["compute_s"])
        # The group's rows of a part of a group's answer: reading pred.summary would cut it.
        whole, lo, hi = source(pred)
        r = whole.referral
        referred = int(np.count_nonzero(r.refer[lo:hi])) if r is not None else 0
        self.observe_summary(model, whole.summary, inputs, pred.samples, referred, lo, hi)

    def observe_summary(
        self,
        model: str,
        summary: RegressionSummary | ClassificationSummary | None,
        inputs: int,
        passes: int | None,
        referred: int = 0,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        """Counts, and the served uncertainty of inputs lo:hi of `summary`."""
        m = self.model(model)
        mode = "mc" if summary is not None else "deterministic"
        self._child(self.predictions, m, mode).inc(inputs)
        if passes:
            self._child(self.passes, m).inc(passes * inputs)
        if referred:
            self._child(self.referrals, m).inc(referred)
        if isinstance(summary, ClassificationSummary):
            child = self._child(self.mutual_information, m)
            for v in np.asarray(summary.mutual_information)[lo:hi].ravel().tolist():
                child.observe(v)
        elif isinstance(summary, RegressionSummary):
            child = self._child(self.epistemic_std, m)
            for v in np.asarray(summary.epistemic_std)[lo:hi].ravel().tolist():
                child.observe(v)


class _Closed(Collector):
    """`mcserve_connections_closed_total{reason}`, read from the connection guard's counts."""

    def __init__(self, closed: Mapping[str, int]) -> None:
        self.closed = closed

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "mcserve_connections_closed",
            "Connections answered or closed below the app, by reason",
            labels=["reason"],
        )
        for reason in sorted(REASONS | set(self.closed)):
            family.add_metric([reason], self.closed.get(reason, 0))
        yield family


class _Budget(Protocol):
    held: int
    limit: int
    refused: int


class _Bodies(Collector):
    """`mcserve_body_bytes_in_flight`, `mcserve_body_bytes_limit` and
    `mcserve_bodies_refused_total`, read from the server's body budget."""

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        b = self.budget
        yield GaugeMetricFamily(
            "mcserve_body_bytes_in_flight", "Request body bytes held by requests in flight", b.held
        )
        yield GaugeMetricFamily(
            "mcserve_body_bytes_limit",
            "The limit on them (MCSERVE_MAX_INFLIGHT_BODY_BYTES)",
            b.limit,
        )
        yield CounterMetricFamily(
            "mcserve_bodies_refused",
            "Requests answered 429 (503 on CDS Hooks) at that limit",
            b.refused,
        )
