"""The work queue of the acceleration service: one job per pushed manifest or index.

* Dedupe: a push whose (registry, repository, digest) is already queued or running adds
  nothing (distribution re-sends events; a tag pushed twice is one image).
* One job per repository at a time: the pushes of a multi-platform image (each platform
  manifest, then the index) are serialised, so the index's job finds the platforms already
  indexed instead of building the same layers twice, and two jobs never race on the same
  `sha256-<hex>` referrers tag.
* Retries: a job that failed for a transient reason (registry down, 5xx) goes back to the
  queue after an exponential backoff, up to max_attempts; then it is failed with the reason.
* Status: queued / running / done / failed (bounded history) and counters, as JSON.

No I/O and no threads of its own: workers call take() and report with finish() / fail().
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from snapshotter.accel.events import PushedImage

DEFAULT_HISTORY = 500
DEFAULT_MAX_QUEUED = 10_000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Outcome(StrEnum):
    INDEXED = "indexed"  # at least one artifact pushed
    ALREADY_INDEXED = "already indexed"  # every platform already had a complete artifact
    NOTHING_TO_INDEX = "nothing to index"  # no layer large enough / indexable
    IGNORED = "ignored"  # not a container image (e.g. lazysnap's own artifact)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Job:
    id: int
    image: PushedImage
    received_at: float  # epoch seconds
    state: JobState = JobState.QUEUED
    attempts: int = 0
    not_before: float = 0.0  # monotonic: a retry waits until then
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    detail: str = ""  # what was done (done) or why it failed (failed)
    last_error: str | None = None  # of the latest failed attempt, kept while retrying
    artifacts: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": str(self.image),
            "registry": self.image.registry,
            "repository": self.image.repository,
            "digest": self.image.digest,
            "tag": self.image.tag,
            "mediaType": self.image.media_type,
            "sender": self.image.sender,
            "state": str(self.state),
            "attempts": self.attempts,
            "received_at": _utc(self.received_at),
        }
        if self.started_at is not None:
            out["started_at"] = _utc(self.started_at)
        if self.finished_at is not None:
            out["finished_at"] = _utc(self.finished_at)
        if self.outcome is not None:
            out["outcome"] = str(self.outcome)
        if self.state is JobState.FAILED:
            out["reason"] = self.detail
        elif self.detail:
            out["detail"] = self.detail
        if self.last_error is not None and self.state is not JobState.FAILED:
            out["last_error"] = self.last_error
        if self.state is JobState.QUEUED and self.not_before > time.monotonic():
            out["retry_in_seconds"] = round(self.not_before - time.monotonic(), 1)
        if self.artifacts:
            out["artifacts"] = list(self.artifacts)
        return out


@dataclass
class Counters:
    received: int = 0  # images accepted from webhooks (before dedupe)
    deduplicated: int = 0
    retries: int = 0
    skipped_events: int = 0  # blobs, pulls, own pushes: never queued
    malformed_events: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    failed: int = 0


class QueueClosed(Exception):
    pass


class QueueFull(Exception):
    """Too many images waiting: the caller should send the delivery again later (the images
    queued from it meanwhile are deduplicated then)."""


class JobQueue:
    def __init__(
        self,
        *,
        max_attempts: int = 5,
        backoff_seconds: float = 2.0,
        max_backoff_seconds: float = 300.0,
        history: int = DEFAULT_HISTORY,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.max_queued = max_queued
        self.counters = Counters()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._pending: list[Job] = []  # queued, in arrival order (retries keep their place)
        self._running: dict[int, Job] = {}
        self._done: deque[Job] = deque(maxlen=history)
        self._failed: deque[Job] = deque(maxlen=history)
        self._closed = False

    # -- producers ----------------------------------------------------------------------------

    def submit(self, image: PushedImage) -> Job | None:
        """Queue image; None when the same image is already queued or running."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the service is shutting down")
            self.counters.received += 1
            active = itertools.chain(self._pending, self._running.values())
            if any(job.image.key == image.key for job in active):
                self.counters.deduplicated += 1
                return None
            if len(self._pending) >= self.max_queued:
                raise QueueFull(
                    f"{len(self._pending)} images are waiting (limit {self.max_queued})"
                )
            job = Job(next(self._ids), image, time.time())
            self._pending.append(job)
            self._cond.notify_all()
            return job

    def note_skipped(self, count: int, malformed: int) -> None:
        with self._cond:
            self.counters.skipped_events += count
            self.counters.malformed_events += malformed

    # -- workers ------------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> Job | None:
        """The next runnable job (its repository idle, its backoff over), marked running.
        Blocks; None when the queue is closed or timeout passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                busy_keys = {(j.image.registry, j.image.repository) for j in self._running.values()}
                wake = deadline
                for job in self._pending:
                    repo_key = (job.image.registry, job.image.repository)
                    if repo_key in busy_keys:
                        continue
                    if job.not_before > now:
                        wake = job.not_before if wake is None else min(wake, job.not_before)
                        busy_keys.add(repo_key)  # keep arrival order within a repository
                        continue
                    self._pending.remove(job)
                    job.state = JobState.RUNNING
                    job.attempts += 1
                    job.started_at = time.time()
                    self._running[job.id] = job
                    return job
                if deadline is not None and now >= deadline:
                    return None
                self._cond.wait(None if wake is None else max(0.0, wake - now))
            return None

    def finish(self, job: Job, outcome: Outcome, detail: str, artifacts: tuple[str, ...]) -> None:
        with self._cond:
            self._running.pop(job.id, None)
            job.state = JobState.DONE
            job.outcome = outcome
            job.detail = detail
            job.artifacts = artifacts
            job.finished_at = time.time()
            self._done.append(job)
            self.counters.by_outcome[str(outcome)] = (
                self.counters.by_outcome.get(str(outcome), 0) + 1
            )
            self._cond.notify_all()

    def fail(self, job: Job, reason: str, *, transient: bool) -> float | None:
        """Record a failed attempt. A transient failure with attempts left is queued again:
        returns the delay in seconds; otherwise the job is failed and None returned."""
        with self._cond:
            self._running.pop(job.id, None)
            job.last_error = reason
            if transient and job.attempts < self.max_attempts and not self._closed:
                delay = min(
                    self.backoff_seconds * 2.0 ** max(0, job.attempts - 1), self.max_backoff_seconds
                )
                job.state = JobState.QUEUED
                job.not_before = time.monotonic() + delay
                self._pending.insert(0, job)  # first in line for its repository
                self.counters.retries += 1
                self._cond.notify_all()
                return delay
            job.state = JobState.FAILED
            job.detail = f"after {job.attempts} attempts: {reason}" if job.attempts > 1 else reason
            job.finished_at = time.time()
            self._failed.append(job)
            self.counters.failed += 1
            self._cond.notify_all()
            return None

    # -- lifecycle / status -------------------------------------------------------------------

    def close(self) -> list[Job]:
        """Stop handing out jobs; returns the jobs that were still queued (they are dropped)."""
        with self._cond:
            self._closed = True
            dropped, self._pending = self._pending, []
            self._cond.notify_all()
            return dropped

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs (after close: the running ones finished)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def status(self) -> dict[str, Any]:
        with self._cond:
            counters = self.counters
            return {
                "queued": [job.to_json() for job in self._pending],
                "running": [job.to_json() for job in self._running.values()],
                "done": [job.to_json() for job in self._done],
                "failed": [job.to_json() for job in self._failed],
                "counts": {
                    "received": counters.received,
                    "deduplicated": counters.deduplicated,
                    "queued": len(self._pending),
                    "running": len(self._running),
                    "retries": counters.retries,
                    "failed": counters.failed,
                    "skipped_events": counters.skipped_events,
                    "malformed_events": counters.malformed_events,
                    **{
                        outcome.replace(" ", "_"): counters.by_outcome.get(outcome, 0)
                        for outcome in map(str, Outcome)
                    },
                },
            }
