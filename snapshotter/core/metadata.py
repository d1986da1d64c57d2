"""Durable snapshot metadata in sqlite (ROOT/metadata.db).

One sqlite transaction per snapshot operation (WAL, synchronous=FULL), so a process killed at any
point leaves either the whole operation or none of it. The store only reads and writes rows; the
rules (which kinds may be committed, who may be removed) live in core/snapshotter.py, which holds
a transaction open across the filesystem steps of an operation.

Differences from containerd's bolt store that nothing outside can observe: a snapshot's parent is
kept as the parent's id (a committed snapshot is never renamed, so the name is stable), and ids
come from a counter row so that an id handed out by a committed transaction is never reused.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from snapshotter.core.errors import NotFound, SnapshotError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY,
    key         TEXT    NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    labels      TEXT    NOT NULL DEFAULT '{}',
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_SELECT = (
    "SELECT s.id, s.key, p.key, s.parent_id, s.kind, s.labels, s.created_ns, s.updated_ns,"
    " s.size, s.inodes FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id"
)


class MetadataError(SnapshotError):
    """The metadata file cannot be used (not a database, newer schema, disk error)."""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots.proto."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()  # "view" | "active" | "committed", as filters spell it


@dataclass(frozen=True)
class SnapshotRecord:
    id: int
    key: str
    parent: str  # the parent's key ("" for none)
    parent_id: int | None
    kind: Kind
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    size: int = 0
    inodes: int = 0


def _clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    # containerd's WriteLabels drops empty values: setting a label to "" deletes it.
    return {k: v for k, v in sorted(labels.items()) if v != ""}


def _record(row: tuple[object, ...]) -> SnapshotRecord:
    rid, key, parent_key, parent_id, kind, labels, created, updated, size, inodes = row
    assert isinstance(rid, int) and isinstance(key, str) and isinstance(kind, int)
    assert isinstance(labels, str) and isinstance(created, int) and isinstance(updated, int)
    assert isinstance(size, int) and isinstance(inodes, int)
    return SnapshotRecord(
        id=rid,
        key=key,
        parent=parent_key if isinstance(parent_key, str) else "",
        parent_id=parent_id if isinstance(parent_id, int) else None,
        kind=Kind(kind),
        labels=json.loads(labels),
        created_ns=created,
        updated_ns=updated,
        size=size,
        inodes=inodes,
    )


class Transaction:
    """Row access inside one open transaction; obtained from MetaStore.transaction()."""

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self._conn = conn
        self.writable = writable

    def find(self, key: str) -> SnapshotRecord | None:
        row = self._conn.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row is not None else None

    def get(self, key: str) -> SnapshotRecord:
        record = self.find(key)
        if record is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return record

    def parent_ids(self, record: SnapshotRecord) -> list[int]:
        """Ids of the ancestors, nearest first (the overlay lowerdir order)."""
        rows = self._conn.execute(
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL SELECT s.id, s.parent_id, c.depth + 1"
            " FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
            " SELECT id FROM chain WHERE depth > 0 ORDER BY depth",
            (record.id,),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def has_children(self, snapshot_id: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)
        ).fetchone()
        return row is not None

    def all(self) -> list[SnapshotRecord]:
        """Every snapshot, ordered by key bytes (bolt's iteration order)."""
        rows = self._conn.execute(_SELECT + " ORDER BY s.key").fetchall()
        return [_record(r) for r in rows]

    def owned_ids(self) -> set[int]:
        return {int(r[0]) for r in self._conn.execute("SELECT id FROM snapshots")}

    def allocate_id(self) -> int:
        """Next snapshot id. Once this transaction commits the id is never handed out again."""
        self._conn.execute("INSERT OR IGNORE INTO counters(name, value) VALUES ('snapshot_id', 0)")
        self._conn.execute(
            "UPDATE counters SET value = max(value, (SELECT coalesce(max(id), 0) FROM snapshots))"
            " + 1 WHERE name = 'snapshot_id'"
        )
        row = self._conn.execute("SELECT value FROM counters WHERE name = 'snapshot_id'").fetchone()
        return int(row[0])

    def insert(
        self,
        snapshot_id: int,
        kind: Kind,
        key: str,
        parent_id: int | None,
        labels: Mapping[str, str],
        now_ns: int,
        size: int = 0,
        inodes: int = 0,
    ) -> SnapshotRecord:
        self._conn.execute(
            "INSERT INTO snapshots(id, key, parent_id, kind, labels, created_ns, updated_ns,"
            " size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                snapshot_id,
                key,
                parent_id,
                int(kind),
                json.dumps(_clean_labels(labels)),
                now_ns,
                now_ns,
                size,
                inodes,
            ),
        )
        return self.get(key)

    def commit_active(
        self, record: SnapshotRecord, name: str, labels: Mapping[str, str], usage: tuple[int, int]
    ) -> SnapshotRecord:
        """Turn an active row into a committed one called name (same id; labels replaced)."""
        size, inodes = usage
        now_ns = time.time_ns()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                json.dumps(_clean_labels(labels)),
                now_ns,
                now_ns,
                size,
                inodes,
                record.id,
            ),
        )
        return self.get(name)

    def set_labels(self, record: SnapshotRecord, labels: Mapping[str, str]) -> SnapshotRecord:
        self._conn.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(_clean_labels(labels)), time.time_ns(), record.id),
        )
        return self.get(record.key)

    def delete(self, record: SnapshotRecord) -> None:
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))


def _make_private(path: str) -> None:
    """The database (and its WAL files, which sqlite creates with the database's mode) 0600
    whatever the umask: it names every image layer this node holds."""
    if path == ":memory:":
        return
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


class MetaStore:
    """The sqlite file; transactions are serialised by a lock (one writer, like bolt)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            _make_private(path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per operation.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we delete the directories it released.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise MetadataError(
                    f"{path}: metadata schema version {version} is newer than this lazysnap "
                    f"understands ({SCHEMA_VERSION})"
                )
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as err:
            raise MetadataError(f"{path}: cannot open snapshot metadata: {err}") from None

    @contextmanager
    def transaction(self, writable: bool) -> Iterator[Transaction]:
        """One transaction; committed if the block returns, rolled back if it raises."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
            except sqlite3.Error as err:
                raise MetadataError(f"{self.path}: cannot begin transaction: {err}") from None
            try:
                yield Transaction(self._conn, writable)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT" if writable else "ROLLBACK")
            except sqlite3.Error as err:
                self._conn.execute("ROLLBACK")
                raise MetadataError(f"{self.path}: cannot commit: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def read_snapshots(path: str) -> list[SnapshotRecord]:
    """Every snapshot in the metadata file at path, opened read-only: for `lazysnap status`,
    which reads beside a running daemon (or none) and must never write. [] when there is no
    file; a row whose labels or kind do not parse is left out. MetadataError naming the file
    when it cannot be read."""
    if not os.path.exists(path):
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(_SELECT).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise MetadataError(f"cannot read snapshot metadata {path}: {err}") from None
    found = []
    for row in rows:
        try:
            record = _record(row)
        except (ValueError, AssertionError):  # labels not JSON, or an unknown kind
            continue
        if isinstance(record.labels, dict):
            found.append(record)
    return found
