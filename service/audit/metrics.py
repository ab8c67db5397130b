"""Prometheus view of the audit writer's counters (read at scrape time, no per-record cost)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.audit.writer import AuditWriter

COUNTERS = (
    ("written", "mcserve_audit_records", "Audit records committed to the store"),
    (
        "refused",
        "mcserve_audit_refused",
        "Predictions answered 503: their record could not be queued",
    ),
    ("dropped", "mcserve_audit_dropped", "Predictions answered without a record (audit_fail_open)"),
    ("store_errors", "mcserve_audit_store_errors", "Failed audit store writes (retried)"),
    (
        "invalid",
        "mcserve_audit_invalid",
        "Audit events not recorded: no row could be made of them, or the store refused its values",
    ),
)


class AuditCollector(Collector):
    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Metric]:
        stats = self.writer.stats
        for attr, name, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr))
        yield GaugeMetricFamily(
            "mcserve_audit_queue", "Audit records waiting to be written", value=self.writer.depth
        )
        yield GaugeMetricFamily(
            "mcserve_audit_queue_bytes",
            "Bytes of audit records waiting to be written (about)",
            value=self.writer.depth_bytes,
        )
        yield GaugeMetricFamily(
            "mcserve_audit_store_up",
            "1 when the last audit store write succeeded",
            value=1.0 if self.writer.healthy else 0.0,
        )
