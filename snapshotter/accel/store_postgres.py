"""The PostgreSQL job store: several `accel serve` replicas share one database.

Same tables and SQL as the SQLite store (store.SqlJobStore). What PostgreSQL adds:
claims lock their candidate row with `FOR UPDATE SKIP LOCKED` (a worker never waits for a
row another worker is claiming, it takes the next one), leases expire when a replica dies
(nothing here knows about processes), and the schema is created under an advisory lock so
replicas starting together do not race. A connection that broke (database restarted) is
opened again on the next call. Driver: psycopg 3 (the `postgres` extra), imported only here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from snapshotter.accel.store import (
    SCHEMA,
    SCHEMA_VERSION,
    SqlJobStore,
    StoreError,
    check_schema_version,
)

_SCHEMA_LOCK = 0x6C617A79  # pg_advisory_xact_lock key: "lazy"


class _Cursor:
    """A psycopg cursor that takes the `?` placeholders the shared SQL is written with."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


def describe(dsn: str) -> str:
    """The database a connection string names, without its password."""
    import psycopg.conninfo

    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"--store: not a PostgreSQL connection string: {exc}") from None
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"job store postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


class PostgresJobStore(SqlJobStore):
    lock_clause = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, connect_timeout: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "--store postgresql://...: the psycopg package is missing "
                "(install lazysnap's `postgres` extra: pip install 'lazysnap[postgres]')"
            ) from None
        self._psycopg = psycopg
        self._dsn = dsn
        self._timeout = connect_timeout
        self.description = describe(dsn)
        self.recovered = 0  # other replicas may be running jobs: only leases tell
        # One connection per lane (store.SqlJobStore._transaction), each used by one thread
        # at a time: webhook intake never waits behind a worker's claim.
        self._mutexes = {"intake": threading.Lock(), "work": threading.Lock()}
        self._conns: dict[str, Any] = {}
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in SCHEMA.format(id="BIGSERIAL PRIMARY KEY").split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("SELECT MAX(version) FROM lazysnap_accel_schema")
            found = cur.fetchone()[0]
            check_schema_version(found, self.description)
            if found is None:
                cur.execute("INSERT INTO lazysnap_accel_schema VALUES (?)", (SCHEMA_VERSION,))

    def _connection(self, lane: str) -> Any:
        conn = self._conns.get(lane)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = self._conns[lane] = self._psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=max(1, int(self._timeout)),
                    application_name="lazysnap-accel",
                )
            except self._psycopg.Error as exc:
                raise StoreError(f"{self.description}: cannot connect: {exc}") from None
        return conn

    @contextlib.contextmanager
    def _transaction(self, lane: str = "work") -> Iterator[Any]:
        with self._mutexes[lane]:
            conn = self._connection(lane)
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    yield _Cursor(cursor)
            except self._psycopg.errors.UniqueViolation:
                raise  # a claim racing another replica's: SqlJobStore.claim looks again
            except self._psycopg.Error as exc:
                raise StoreError(f"{self.description}: {exc}") from None

    def _is_conflict(self, exc: Exception) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def close(self) -> None:
        for lane, mutex in self._mutexes.items():
            with mutex:
                conn = self._conns.pop(lane, None)
                if conn is not None:
                    conn.close()
