"""The job store a --store value names: a PostgreSQL URL (several replicas share it) or an SQLite
file (one service). Apart from store.py so that the SQLite store and the interface never import
the PostgreSQL one (which imports them)."""

from __future__ import annotations

from snapshotter.accel.store import JobStore, SqliteJobStore, is_postgres


def open_store(spec: str) -> JobStore:
    """`postgresql://...` (or `postgres://`) or a file path. StoreError naming it."""
    if is_postgres(spec):
        from snapshotter.accel.store_postgres import PostgresJobStore

        return PostgresJobStore(spec)
    return SqliteJobStore(spec)
