"""One job of the acceleration service as the store keeps it, and how the APIs show it.

Times are epoch seconds (wall clock): several replicas on several machines compare them
(leases, retry times), so they cannot be monotonic readings of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from snapshotter.accel.events import PushedImage


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


# The task API's words (acceld-compatible list): a done job succeeded, whatever its outcome.
TASK_STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "running",
    JobState.DONE: "succeeded",
    JobState.FAILED: "failed",
}
STATE_OF_TASK_STATUS = {status: state for state, status in TASK_STATUS.items()}


MAX_BACKOFF_SECONDS = 300.0  # no retry waits longer, however many attempts came before


def retry_delay(attempts: int, backoff_seconds: float, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling from backoff."""
    return float(min(backoff_seconds * 2.0 ** max(0, attempts - 1), cap))


def failure_detail(reason: str, attempts: int) -> str:
    """A failed job's reason, saying how many attempts it took when more than one."""
    return f"after {attempts} attempts: {reason}" if attempts > 1 else reason


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Job:
    id: int
    image: PushedImage
    received_at: float
    state: JobState = JobState.QUEUED
    attempts: int = 0
    not_before: float = 0.0  # a retry waits until then
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    detail: str = ""  # what was done (done) or why it failed (failed)
    last_error: str | None = None  # of the latest failed attempt, kept while retrying
    artifacts: tuple[str, ...] = ()
    lease_owner: str | None = None  # the worker running it
    lease_expires: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)

    def to_json(self, now: float) -> dict[str, Any]:
        """The /status document's entry (lazysnap's own, detailed shape)."""
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
            "received_at": utc(self.received_at),
        }
        if self.started_at is not None:
            out["started_at"] = utc(self.started_at)
        if self.finished_at is not None:
            out["finished_at"] = utc(self.finished_at)
        if self.outcome is not None:
            out["outcome"] = str(self.outcome)
        if self.state is JobState.FAILED:
            out["reason"] = self.detail
        elif self.detail:
            out["detail"] = self.detail
        if self.last_error is not None and self.state is not JobState.FAILED:
            out["last_error"] = self.last_error
        if self.state is JobState.QUEUED and self.not_before > now:
            out["retry_in_seconds"] = round(self.not_before - now, 1)
        if self.state is JobState.RUNNING and self.lease_owner:
            out["worker"] = self.lease_owner
        if self.artifacts:
            out["artifacts"] = list(self.artifacts)
        return out

    def to_task(self) -> dict[str, Any]:
        """The task API's entry (GET /api/v1/conversions, `lazysnap accel tasks --json`):
        acceld's fields (id, created, finished, source, status, reason) plus ours."""
        reason = ""
        if self.state is JobState.FAILED:
            reason = self.detail
        elif self.last_error and not self.finished:
            reason = f"retrying: {self.last_error}"
        return {
            "id": str(self.id),
            # No digest: a reference that could not be resolved (`accel convert`), as given.
            "image": self.image.reference if self.image.digest else self.image.repository,
            "source": str(self.image),
            "status": TASK_STATUS[self.state],
            "reason": reason,
            "created": utc(self.received_at),
            "finished": utc(self.finished_at) if self.finished_at is not None else None,
            "outcome": str(self.outcome) if self.outcome is not None else None,
            "detail": self.detail if self.state is JobState.DONE else "",
            "attempts": self.attempts,
            "artifacts": list(self.artifacts),
        }
