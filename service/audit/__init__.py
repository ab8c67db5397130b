"""The audit trail: every prediction recorded append-only and replayable (docs/AUDIT.md).

record.py (what the request path hands over), arrays.py (input arrays as kept: bytes, layout,
HMAC), rows.py (what is kept, torch-free), store.py (what both stores share), sqlite.py and
postgres.py (the two stores, schema and migrations), backend.py (which one), backlog.py (the
queue, bounded in records and bytes), writer.py (its background task), sink.py (the writer
process that commits the rows), replay.py (recompute and compare; its inputs in inputs.py, the
comparison in compare.py), metrics.py (Prometheus view), cli.py (`python -m service audit ...`).
No FastAPI import here: the HTTP side is `service/api/common/audit.py`.
"""
