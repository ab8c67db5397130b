"""The audit trail: every prediction recorded append-only and replayable (docs/AUDIT.md).

record.py (what is kept), store.py (SQLite / PostgreSQL, schema and migrations), writer.py (the
bounded queue and its background writer), replay.py (recompute and compare), metrics.py
(Prometheus view), cli.py (`python -m service audit ...`). No FastAPI import here: the HTTP side
is `service/api/audit.py`.
"""
