"""The work queue of the acceleration service, over a durable job store (store.py).

* Durable: submit() returns once the job is committed to the store, so a webhook is
  answered only for work that survives a crash; a restarted service (or another replica)
  picks up queued and interrupted jobs.
* Dedupe: a push whose (registry, repository, digest) is already queued or running adds
  nothing (distribution re-sends events; a tag pushed twice is one image).
* One job per repository at a time, in arrival order (the store's claim rules).
* Retries: a job that failed for a transient reason (registry down, 5xx) goes back to the
  store with a time before which it does not run (exponential backoff), up to max_attempts;
  then it is failed with the reason.
* Leases: the jobs this process runs are held under its owner name; renew() (called by the
  service's heartbeat) keeps them, and a process that dies lets them expire for others.
* Status: queued / running / done / failed (bounded history) and counters, as JSON.

No threads of its own: workers call take() and report with finish() / fail(). Time comes
from the clock it is given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapshotter.accel.events import PushedImage
from snapshotter.accel.record import (
    MAX_BACKOFF_SECONDS,
    Job,
    JobState,
    Outcome,
    failure_detail,
    retry_delay,
)
from snapshotter.accel.store import DEFAULT_KEEP_FINISHED, JobStore, StoreFull

log = logging.getLogger("lazysnap.accel")

DEFAULT_HISTORY = 500
DEFAULT_MAX_QUEUED = 10_000
PRUNE_EVERY = 100  # finished jobs between two prunes of the store's history


@dataclass
class Counters:
    """What this process saw since it started (the store knows the jobs)."""

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
        store: JobStore,
        *,
        owner: str,
        clock: Callable[[], float] = time.time,
        max_attempts: int = 5,
        backoff_seconds: float = 2.0,
        max_backoff_seconds: float = MAX_BACKOFF_SECONDS,
        lease_seconds: float = 60.0,
        poll_seconds: float = 1.0,
        history: int = DEFAULT_HISTORY,
        max_queued: int = DEFAULT_MAX_QUEUED,
        keep_finished: int = DEFAULT_KEEP_FINISHED,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.store = store
        self.owner = owner
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.history = history
        self.max_queued = max_queued
        self.keep_finished = keep_finished
        self.counters = Counters()
        self._cond = threading.Condition()
        self._running: dict[int, Job] = {}  # what this process's workers hold
        self._finished_since_prune = 0
        self._closed = False

    # -- producers ----------------------------------------------------------------------------

    def submit(self, image: PushedImage) -> tuple[Job, bool]:
        """Queue image durably: (job, True) for a new job, (the live job, False) when the
        same image is already queued or running."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the service is shutting down")
            self.counters.received += 1
        try:
            job, created = self.store.submit(image, self.clock(), self.max_queued)
        except StoreFull as exc:
            raise QueueFull(str(exc)) from None
        with self._cond:
            if not created:
                self.counters.deduplicated += 1
            self._cond.notify()  # one new job: one worker to look for it
        return job, created

    def note_skipped(self, count: int, malformed: int) -> None:
        with self._cond:
            self.counters.skipped_events += count
            self.counters.malformed_events += malformed

    # -- workers ------------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> Job | None:
        """The next runnable job, claimed under this process's lease. Blocks (looking at the
        store when woken by a local submit or finish, else every poll_seconds: other
        replicas' jobs and retry times); None when the queue is closed or timeout passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    return None
            job = self.store.claim(self.owner, self.clock(), self.lease_seconds)
            with self._cond:
                if job is not None:
                    if self._closed:  # closed while claiming: leave it for the next start
                        self.store.release(self.owner, [job.id])
                        return None
                    self._running[job.id] = job
                    return job
                wait = self.poll_seconds
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = min(wait, left)
                if not self._closed:
                    self._cond.wait(wait)

    def finish(self, job: Job, outcome: Outcome, detail: str, artifacts: tuple[str, ...]) -> None:
        held = self.store.finish(job, self.owner, self.clock(), outcome, detail, artifacts)
        if not held:
            log.warning("job %d: finished after its lease was lost; another worker took it", job.id)
        job.state, job.outcome = JobState.DONE, outcome
        job.detail, job.artifacts = detail, artifacts
        with self._cond:
            self.counters.by_outcome[str(outcome)] = (
                self.counters.by_outcome.get(str(outcome), 0) + 1
            )
            self._ended(job)

    def fail(self, job: Job, reason: str, *, transient: bool) -> float | None:
        """Record a failed attempt. A transient failure with attempts left is queued again:
        returns the delay in seconds; otherwise the job is failed and None returned."""
        job.last_error = reason
        if transient and job.attempts < self.max_attempts:
            delay = retry_delay(job.attempts, self.backoff_seconds, self.max_backoff_seconds)
            # Closed meanwhile: the retry stays in the store for the next start anyway.
            self.store.retry(job, self.owner, self.clock() + delay, reason)
            job.state = JobState.QUEUED
            with self._cond:
                self.counters.retries += 1
                self._ended(job)
            return delay
        job.detail = failure_detail(reason, job.attempts)
        self.store.fail(job, self.owner, self.clock(), job.detail)
        job.state = JobState.FAILED
        with self._cond:
            self.counters.failed += 1
            self._ended(job)
        return None

    def _ended(self, job: Job) -> None:
        """With self._cond held: job is no longer this process's."""
        self._running.pop(job.id, None)
        self._finished_since_prune += 1
        if self._finished_since_prune >= PRUNE_EVERY:
            self._finished_since_prune = 0
            self.store.prune(self.keep_finished)
        self._cond.notify_all()

    def renew(self) -> list[Job]:
        """Extend the leases of the jobs this process runs; returns those it lost (a stall
        longer than the lease let another worker take them)."""
        with self._cond:
            running = list(self._running.values())
        held = self.store.renew(
            self.owner, [job.id for job in running], self.clock(), self.lease_seconds
        )
        return [job for job in running if job.id not in held]

    # -- lifecycle / status -------------------------------------------------------------------

    def close(self) -> int:
        """Stop handing out jobs; returns how many stay queued in the store."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return self.store.counts().by_state[JobState.QUEUED]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until this process runs no job (after close: the running ones finished)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def release_running(self) -> int:
        """Give this process's running jobs back to the store (queued, for the next start or
        another replica): a stop that cannot wait for them."""
        with self._cond:
            ids = list(self._running)
        return self.store.release(self.owner, ids)

    def wait_finished(self, job_ids: Sequence[int], timeout: float) -> list[Job] | None:
        """The jobs once every one is done or failed (run here or by another replica), or
        None after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [self.store.get(job_id) for job_id in job_ids]
            found = [job for job in jobs if job is not None]
            if all(job.finished for job in found):
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                self._cond.wait(min(self.poll_seconds, left))

    def tasks(self, states: Sequence[JobState] = (), limit: int = DEFAULT_HISTORY) -> list[Job]:
        return self.store.jobs(states, limit)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        counts = self.store.counts()
        lists = {
            str(state): [
                job.to_json(now) for job in reversed(self.store.jobs((state,), self.history))
            ]
            for state in JobState
        }
        with self._cond:
            counters = self.counters
            return {
                **lists,
                "counts": {
                    "received": counters.received,
                    "deduplicated": counters.deduplicated,
                    "queued": counts.by_state[JobState.QUEUED],
                    "running": counts.by_state[JobState.RUNNING],
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
