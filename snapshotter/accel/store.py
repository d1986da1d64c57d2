"""Where the acceleration service's jobs live, so none is lost when the process dies.

A job is written here before its webhook is answered. Workers claim queued jobs with a
lease (owner + expiry time); a worker renews the leases of the jobs it runs, and a job whose
lease expired (its worker was killed, its machine rebooted) is queued again by the next
claim of any worker: at-least-once. Indexing is idempotent (an already indexed image is a
quick no-op), so running a job twice costs little and loses nothing.

The same SQL runs on two databases (JobStore is the interface the queue uses):

* SQLite (SqliteJobStore): the embedded default, one file under the service's state dir,
  for one replica. It holds an exclusive lock on `<file>.lock` while open, so a second
  service on the same file is refused, and on open it re-queues what a dead predecessor
  left running without waiting for leases.
* PostgreSQL (store_postgres.PostgresJobStore): for several replicas on several machines;
  claims lock the chosen row with `FOR UPDATE SKIP LOCKED` so concurrent workers never
  wait on each other's candidates.

Rules kept by unique columns, so they hold across replicas without a lock of ours:
  active_key   registry/repository@digest while queued or running: one live job per image
               (a duplicate webhook finds the live job instead of adding one)
  running_repo registry/repository while running: one job per repository at a time (the
               platforms of an index are indexed before the index; two jobs never race on
               one `sha256-<hex>` referrers tag)
Within a repository, jobs run in arrival order (a job waiting for its retry keeps the later
pushes of its repository behind it).

Every method takes `now` (epoch seconds): callers pass time in, tests pass their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from snapshotter.accel.events import PushedImage
from snapshotter.accel.record import Job, JobState, Outcome

SCHEMA_VERSION = 1
DEFAULT_KEEP_FINISHED = 10_000  # finished jobs kept for the task list; older ones pruned
_COLUMNS = (
    "id, registry, repository, digest, tag, media_type, sender, state, attempts, not_before,"
    " created, started, finished, outcome, detail, last_error, artifacts, lease_owner,"
    " lease_expires"
)
# {id} is the id column's definition, which differs between the two databases.
SCHEMA = """
CREATE TABLE IF NOT EXISTS lazysnap_accel_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lazysnap_accel_jobs (
    id {id},
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    tag TEXT,
    media_type TEXT,
    sender TEXT NOT NULL,
    state TEXT NOT NULL,
    active_key TEXT UNIQUE,
    running_repo TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    outcome TEXT,
    detail TEXT NOT NULL DEFAULT '',
    last_error TEXT,
    artifacts TEXT NOT NULL DEFAULT '[]',
    lease_owner TEXT,
    lease_expires DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS lazysnap_accel_jobs_state ON lazysnap_accel_jobs (state, id);
CREATE INDEX IF NOT EXISTS lazysnap_accel_jobs_repo
    ON lazysnap_accel_jobs (registry, repository, state);
"""


class StoreError(Exception):
    """The store cannot be opened or used; the message names it."""


class StoreFull(StoreError):
    """Too many queued jobs (submit's max_queued); the message says how many."""


class StoreBusy(StoreError):
    """Another service holds this (single-replica) store."""


@dataclass(frozen=True)
class Counts:
    by_state: dict[str, int]
    oldest_queued: float | None  # created time of the oldest queued job


class JobStore(Protocol):
    """What the queue needs from a store. Every change is committed before returning."""

    description: str  # for logs: the file, or the database without password
    recovered: int  # jobs found running at open and queued again (SQLite: a dead service's)

    def submit(
        self, image: PushedImage, now: float, max_queued: int | None = None
    ) -> tuple[Job, bool]:
        """The live job of image: (a new queued job, True), or (the one already queued or
        running, False). StoreFull when a new job would make more than max_queued queued."""
        ...

    def claim(self, owner: str, now: float, lease_seconds: float) -> Job | None:
        """Re-queue jobs whose lease expired, then mark the next runnable job running under
        owner's lease (attempts + 1) and return it; None when nothing is runnable."""
        ...

    def renew(
        self, owner: str, job_ids: Sequence[int], now: float, lease_seconds: float
    ) -> set[int]:
        """Extend owner's leases; returns the ids owner still holds."""
        ...

    def finish(
        self,
        job: Job,
        owner: str,
        now: float,
        outcome: Outcome,
        detail: str,
        artifacts: tuple[str, ...],
    ) -> bool:
        """Mark job done. False if owner no longer held it (its lease expired and another
        worker took it: that worker's result will count)."""
        ...

    def retry(self, job: Job, owner: str, not_before: float, error: str) -> bool:
        """Queue job again, to run no earlier than not_before."""
        ...

    def fail(self, job: Job, owner: str, now: float, reason: str) -> bool: ...

    def release(self, owner: str, job_ids: Sequence[int]) -> int:
        """Queue owner's running jobs again now (a stop that could not wait for them)."""
        ...

    def get(self, job_id: int) -> Job | None: ...

    def jobs(self, states: Sequence[JobState] = (), limit: int = 500) -> list[Job]:
        """Jobs in states (all when empty), newest first."""
        ...

    def counts(self) -> Counts: ...

    def prune(self, keep: int) -> int:
        """Delete finished jobs beyond the newest keep; returns how many."""
        ...

    def close(self) -> None: ...


class SqlJobStore:
    """The SQL both databases share. Subclasses give a transaction context (a cursor whose
    execute takes `?` placeholders) and, for PostgreSQL, the row lock clause."""

    description = "job store"
    recovered = 0
    lock_clause = ""  # appended to the claim's SELECT

    @contextlib.contextmanager
    def _transaction(self, lane: str = "work") -> Iterator[Any]:
        """lane: "intake" (webhook submits) or "work" (everything else); a store may give
        each its own connection so webhook answers do not wait behind workers' claims."""
        raise NotImplementedError
        yield

    def _is_conflict(self, exc: Exception) -> bool:
        """Whether exc is a unique violation another replica's concurrent claim caused."""
        return False

    # -- writes -------------------------------------------------------------------------------

    def submit(
        self, image: PushedImage, now: float, max_queued: int | None = None
    ) -> tuple[Job, bool]:
        key = _active_key(image)
        for _ in range(5):  # the live job may finish between our insert and our select
            with self._transaction("intake") as cur:
                cur.execute(
                    f"SELECT {_COLUMNS} FROM lazysnap_accel_jobs WHERE active_key = ?", (key,)
                )
                live = cur.fetchone()
                if live is not None:
                    return _job(live), False
                if max_queued is not None:
                    cur.execute("SELECT COUNT(*) FROM lazysnap_accel_jobs WHERE state = 'queued'")
                    queued = int(cur.fetchone()[0])
                    if queued >= max_queued:
                        raise StoreFull(f"{queued} images are waiting (limit {max_queued})")
                cur.execute(
                    "INSERT INTO lazysnap_accel_jobs (registry, repository, digest, tag,"
                    " media_type, sender, state, active_key, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)"
                    " ON CONFLICT (active_key) DO NOTHING RETURNING id",
                    (
                        image.registry,
                        image.repository,
                        image.digest,
                        image.tag,
                        image.media_type,
                        image.sender,
                        key,
                        now,
                    ),
                )
                row = cur.fetchone()
                if row is not None:
                    return Job(id=int(row[0]), image=image, received_at=now), True
                # Another replica queued the same image since our select: look again.
        raise StoreError(f"{self.description}: cannot queue {image}: the row keeps changing")

    def claim(self, owner: str, now: float, lease_seconds: float) -> Job | None:
        for _ in range(5):
            try:
                return self._claim_once(owner, now, lease_seconds)
            except Exception as exc:
                if not self._is_conflict(exc):
                    raise
                # Another replica claimed a job of the same repository at the same moment:
                # look again (that repository is busy now).
        return None

    def _claim_once(self, owner: str, now: float, lease_seconds: float) -> Job | None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE lazysnap_accel_jobs SET state = 'queued', running_repo = NULL,"
                " lease_owner = NULL, lease_expires = NULL,"
                " last_error = 'worker ' || lease_owner || ' stopped (lease expired)'"
                " WHERE state = 'running' AND lease_expires < ?",
                (now,),
            )
            cur.execute(
                "SELECT id FROM lazysnap_accel_jobs j WHERE state = 'queued'"
                " AND not_before <= ?"
                " AND NOT EXISTS (SELECT 1 FROM lazysnap_accel_jobs r"
                "   WHERE r.running_repo = j.registry || '/' || j.repository)"
                " AND NOT EXISTS (SELECT 1 FROM lazysnap_accel_jobs e"
                "   WHERE e.registry = j.registry AND e.repository = j.repository"
                "   AND e.state = 'queued' AND e.id < j.id)"
                " ORDER BY id LIMIT 1" + self.lock_clause,
                (now,),
            )
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(
                "UPDATE lazysnap_accel_jobs SET state = 'running',"
                " running_repo = registry || '/' || repository, attempts = attempts + 1,"
                " started = ?, lease_owner = ?, lease_expires = ? WHERE id = ?",
                (now, owner, now + lease_seconds, row[0]),
            )
            cur.execute(f"SELECT {_COLUMNS} FROM lazysnap_accel_jobs WHERE id = ?", (row[0],))
            return _job(cur.fetchone())

    def renew(
        self, owner: str, job_ids: Sequence[int], now: float, lease_seconds: float
    ) -> set[int]:
        held: set[int] = set()
        if not job_ids:
            return held
        with self._transaction() as cur:
            for job_id in job_ids:
                cur.execute(
                    "UPDATE lazysnap_accel_jobs SET lease_expires = ?"
                    " WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING id",
                    (now + lease_seconds, job_id, owner),
                )
                if cur.fetchone() is not None:
                    held.add(job_id)
        return held

    def finish(
        self,
        job: Job,
        owner: str,
        now: float,
        outcome: Outcome,
        detail: str,
        artifacts: tuple[str, ...],
    ) -> bool:
        return self._end(
            job.id,
            owner,
            "state = 'done', outcome = ?, detail = ?, artifacts = ?, finished = ?",
            (str(outcome), detail, json.dumps(list(artifacts)), now),
        )

    def fail(self, job: Job, owner: str, now: float, reason: str) -> bool:
        return self._end(
            job.id,
            owner,
            "state = 'failed', detail = ?, last_error = ?, finished = ?",
            (reason, reason, now),
        )

    def retry(self, job: Job, owner: str, not_before: float, error: str) -> bool:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE lazysnap_accel_jobs SET state = 'queued', running_repo = NULL,"
                " lease_owner = NULL, lease_expires = NULL, not_before = ?, last_error = ?"
                " WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING id",
                (not_before, error, job.id, owner),
            )
            return cur.fetchone() is not None

    def _end(self, job_id: int, owner: str, assignments: str, values: tuple[Any, ...]) -> bool:
        with self._transaction() as cur:
            cur.execute(
                f"UPDATE lazysnap_accel_jobs SET {assignments}, active_key = NULL,"
                " running_repo = NULL, lease_owner = NULL, lease_expires = NULL"
                " WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING id",
                (*values, job_id, owner),
            )
            return cur.fetchone() is not None

    def release(self, owner: str, job_ids: Sequence[int]) -> int:
        released = 0
        with self._transaction() as cur:
            for job_id in job_ids:
                cur.execute(
                    "UPDATE lazysnap_accel_jobs SET state = 'queued', running_repo = NULL,"
                    " lease_owner = NULL, lease_expires = NULL"
                    " WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING id",
                    (job_id, owner),
                )
                released += cur.fetchone() is not None
        return released

    def prune(self, keep: int) -> int:
        with self._transaction() as cur:
            cur.execute(
                "SELECT id FROM lazysnap_accel_jobs WHERE state IN ('done', 'failed')"
                " ORDER BY id DESC LIMIT 1 OFFSET ?",
                (keep,),
            )
            row = cur.fetchone()
            if row is None:
                return 0
            cur.execute(
                "DELETE FROM lazysnap_accel_jobs WHERE state IN ('done', 'failed') AND id <= ?",
                (row[0],),
            )
            return int(cur.rowcount)

    # -- reads --------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        with self._transaction() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM lazysnap_accel_jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            return None if row is None else _job(row)

    def jobs(self, states: Sequence[JobState] = (), limit: int = 500) -> list[Job]:
        where = ""
        params: list[Any] = []
        if states:
            where = " WHERE state IN (" + ", ".join("?" for _ in states) + ")"
            params = [str(state) for state in states]
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM lazysnap_accel_jobs{where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            )
            return [_job(row) for row in cur.fetchall()]

    def counts(self) -> Counts:
        with self._transaction() as cur:
            cur.execute("SELECT state, COUNT(*) FROM lazysnap_accel_jobs GROUP BY state")
            by_state = {str(state): int(count) for state, count in cur.fetchall()}
            cur.execute("SELECT MIN(created) FROM lazysnap_accel_jobs WHERE state = 'queued'")
            row = cur.fetchone()
        oldest = None if row is None or row[0] is None else float(row[0])
        return Counts({str(s): by_state.get(str(s), 0) for s in JobState}, oldest)


def _active_key(image: PushedImage) -> str:
    return f"{image.registry}/{image.repository}@{image.digest}"


def _job(row: Sequence[Any]) -> Job:
    (
        job_id,
        registry,
        repository,
        digest,
        tag,
        media_type,
        sender,
        state,
        attempts,
        not_before,
        created,
        started,
        finished,
        outcome,
        detail,
        last_error,
        artifacts,
        lease_owner,
        lease_expires,
    ) = row
    return Job(
        id=int(job_id),
        image=PushedImage(registry, repository, digest, tag, media_type, sender),
        received_at=float(created),
        state=JobState(state),
        attempts=int(attempts),
        not_before=float(not_before),
        started_at=None if started is None else float(started),
        finished_at=None if finished is None else float(finished),
        outcome=None if outcome is None else Outcome(outcome),
        detail=detail or "",
        last_error=last_error,
        artifacts=tuple(json.loads(artifacts or "[]")),
        lease_owner=lease_owner,
        lease_expires=None if lease_expires is None else float(lease_expires),
    )


def check_schema_version(found: int | None, description: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise StoreError(
            f"{description}: schema version {found} was written by a newer lazysnap "
            f"(this one knows version {SCHEMA_VERSION}); upgrade this service"
        )


class SqliteJobStore(SqlJobStore):
    """The embedded store: one SQLite file (WAL, fsync on commit), one service at a time.
    read_only: for `lazysnap accel tasks` beside a running service (no lock, no recovery)."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.description = f"job store {path}"
        self._mutex = threading.Lock()
        if read_only:
            if not os.path.isfile(path):
                raise StoreError(f"{self.description}: no such file")
            self._lock_fd = -1
            try:
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                self._db = sqlite3.connect(
                    uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.description}: {exc}") from None
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # Image names only, but nobody else's business: 0600 (SQLite gives its -wal and
            # -shm files the database file's mode).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreError(f"{self.description}: cannot create: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreBusy(
                f"{self.description}: another `lazysnap accel serve` uses it (SQLite is for "
                "one replica; several replicas share a postgresql:// store)"
            ) from None
        try:
            # One connection for every thread, serialised by our lock: commits are short.
            self._db = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a reboot keeps answered webhooks
            self._db.executescript(SCHEMA.format(id="INTEGER PRIMARY KEY AUTOINCREMENT"))
            with self._transaction() as cur:
                cur.execute("SELECT MAX(version) FROM lazysnap_accel_schema")
                found = cur.fetchone()[0]
                check_schema_version(found, self.description)
                if found is None:
                    cur.execute("INSERT INTO lazysnap_accel_schema VALUES (?)", (SCHEMA_VERSION,))
                # We hold the only lock: whatever is 'running' was left by a dead service.
                cur.execute(
                    "UPDATE lazysnap_accel_jobs SET state = 'queued', running_repo = NULL,"
                    " lease_owner = NULL, lease_expires = NULL,"
                    " last_error = 'interrupted: the service stopped while indexing'"
                    " WHERE state = 'running'"
                )
                self.recovered = int(cur.rowcount)
        except (sqlite3.Error, StoreError) as exc:
            os.close(self._lock_fd)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.description}: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self, lane: str = "work") -> Iterator[Any]:
        del lane  # one connection: SQLite runs one write transaction at a time anyway
        with self._mutex:
            try:
                cur = self._db.cursor()
                cur.execute("BEGIN" if self._lock_fd < 0 else "BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.description}: {exc}") from None

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)


def is_postgres(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))
