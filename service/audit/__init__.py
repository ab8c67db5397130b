"""The audit trail: every prediction recorded append-only and replayable (docs/AUDIT.md).

record.py (what the request path hands over), rows.py (what is kept, torch-free), store.py
(SQLite / PostgreSQL, schema and migrations), writer.py (the bounded queue and its background
task), sink.py (the writer process that commits the rows), replay.py (recompute and compare),
metrics.py (Prometheus view), cli.py (`python -m service audit ...`). No FastAPI import here:
the HTTP side is `service/api/common/audit.py`.
"""
