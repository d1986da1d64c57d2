"""What this mount process knows of each span of its layer, as one state machine per span:

    absent --claim--> in flight --verified and stored--> cached
                          |
                          +--failed--> absent           (a quick failure: retry costs little)
                          +--failed slowly or ran out of time--> failing until T --T--> absent

`cached` is the span cache's word, not this table's: a span leaves the table when its fetch
succeeds, and the cache (which may evict it later, back to absent) answers for it from then on.

An attempt has a deadline, fetch_timeout after it started, and nobody waits on it past that:
a reader that joins an attempt late gets its data or SpanReadError by the same deadline, so one
read costs at most one fetch timeout even when the kernel sends it as several FUSE requests
(readahead, then the read of the page that readahead failed to fill). An attempt that ran out
of time, or failed slowly, fails fast for RETRY_AFTER_FAILURE_S: claims of its span in that
window do not start a fetch that a hung registry would hold for a whole timeout again. They
fail at once, or, while the attempt's thread is still waiting on the registry, after giving it
LATE_RESULT_GRACE_S to answer (a registry that resumes answers the old request first). After
the window, the next claim starts a new attempt even if the old one's thread is still stuck; a
late result of that thread that verifies also serves the new attempt's readers. A quick
failure (connection refused, bytes that do not verify) is not remembered.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from snapshotter.fs.clock import Clock

# How long a failed or timed-out span fails fast: long enough to cover the kernel's immediate
# re-request of the pages whose read just got EIO, short enough that a user's retry a moment
# later reaches the registry again.
RETRY_AFTER_FAILURE_S = 1.0
# A failure that took at least this fraction of the fetch timeout is slow: repeating it at once
# would make the next request wait about as long again.
SLOW_FAILURE_FRACTION = 0.5
# How long a request in the fail-fast window waits for the late result of an attempt whose
# thread is still in the registry: little next to a fetch timeout, enough for a resumed registry.
LATE_RESULT_GRACE_S = 0.5


class SpanReadError(Exception):
    """A span could not be fetched or did not verify. Never accompanied by data."""

    def __init__(self, layer_digest: str, span_no: int, cause: str) -> None:
        super().__init__(f"layer {layer_digest} span {span_no}: {cause}")
        self.layer_digest = layer_digest
        self.span_no = span_no
        self.cause = cause


class SpanState(Enum):
    ABSENT = "absent"  # neither in flight nor failing: a claim starts a fetch (or finds it cached)
    IN_FLIGHT = "in flight"  # an attempt is running and within its deadline
    FAILING = "failing"  # its last attempt failed slowly or timed out: claims fail fast until T


@dataclass(eq=False)
class Attempt:
    """One fetch of one span, shared by every reader of the span until it ends. Resolved once,
    under the table's lock: data, or the cause of its failure."""

    started: float  # clock.monotonic()
    deadline: float  # started + fetch_timeout: nobody waits on it longer
    read_ahead: bool = False  # started by read-ahead: no read needed the span yet
    ended: float = math.inf  # when its fetch failed, if it did
    data: bytes | None = None
    cause: str | None = None  # why it failed
    done: threading.Event = field(default_factory=threading.Event)

    def fails_fast_until(self) -> float:
        """Until when claims of its span fail at once rather than start a new attempt;
        meaningful once it failed or ran out of time."""
        failed_at = min(self.ended, self.deadline)  # when its readers were told
        if failed_at - self.started < SLOW_FAILURE_FRACTION * (self.deadline - self.started):
            return failed_at
        return failed_at + RETRY_AFTER_FAILURE_S

    def failed_quickly(self) -> bool:
        """It failed, and a new attempt may start at once."""
        return self.done.is_set() and self.fails_fast_until() <= self.ended


@dataclass(frozen=True)
class Claim:
    """The attempt a reader of a span waits on, until when at most, and whether the claimer
    created it (and so must have it fetched)."""

    attempt: Attempt
    is_new: bool
    wait_until: float


class SpanTable:
    """The in-flight and failing spans of one layer (absent: not in the table)."""

    def __init__(self, layer_digest: str, fetch_timeout: float, clock: Clock) -> None:
        self.layer_digest = layer_digest
        self.fetch_timeout = fetch_timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._attempts: dict[int, Attempt] = {}
        # Span number -> failures in which the registry's answer did not fit the index (bytes
        # that do not verify, a range outside the blob): trying again will not help.
        self._bad_data: dict[int, int] = {}

    def state(self, span_no: int) -> SpanState:
        with self._lock:
            return self._state(self._attempts.get(span_no), self.clock.monotonic())

    def claim(
        self, span_no: int, is_cached: Callable[[], bool] | None, *, read_ahead: bool = False
    ) -> Claim | None:
        """The attempt to wait on for span_no: the one in flight or failing, else a new one
        (absent -> in flight). None when is_cached (asked only for an absent span) says the
        span reached the cache meanwhile; is_cached None: claim regardless."""
        now = self.clock.monotonic()
        with self._lock:
            attempt = self._attempts.get(span_no)
            state = self._state(attempt, now)
            if state is SpanState.IN_FLIGHT:
                assert attempt is not None
                return Claim(attempt, False, attempt.deadline)
            if state is SpanState.FAILING:
                assert attempt is not None
                stuck = not attempt.done.is_set()
                return Claim(attempt, False, now + LATE_RESULT_GRACE_S if stuck else now)
            # absent: an old attempt's thread still stuck in the registry finishes unwaited
            if is_cached is not None and is_cached():
                return None
            attempt = Attempt(now, now + self.fetch_timeout, read_ahead)
            self._attempts[span_no] = attempt
            return Claim(attempt, True, attempt.deadline)

    def succeed(self, span_no: int, attempt: Attempt, data: bytes) -> None:
        """attempt's fetch verified data (and it was offered to the cache): it serves its
        readers and those of a newer attempt that replaced it after its deadline."""
        with self._lock:
            self._bad_data.pop(span_no, None)
            current = self._attempts.get(span_no)
            if current is not None and (current is attempt or not current.done.is_set()):
                del self._attempts[span_no]  # in flight -> cached
            for served in (attempt, current):
                if served is not None and not served.done.is_set():  # a late fetch's already
                    served.data = data
                    served.done.set()

    def fail(self, span_no: int, attempt: Attempt, cause: str, *, bad_data: bool = False) -> None:
        """attempt's fetch failed: its readers get SpanReadError; it stays in the table, where
        it is failing or (a quick failure) absent."""
        with self._lock:
            if bad_data:
                self._bad_data[span_no] = self._bad_data.get(span_no, 0) + 1
            attempt.ended = self.clock.monotonic()
            if not attempt.done.is_set():  # served by a late fetch already
                attempt.cause = cause
                attempt.done.set()

    def wait(self, span_no: int, attempt: Attempt, wait_until: float) -> bytes:
        """The span's bytes, or SpanReadError by wait_until."""
        if not self.clock.wait(attempt.done, wait_until - self.clock.monotonic()):
            raise SpanReadError(
                self.layer_digest, span_no, f"no data within {self.fetch_timeout:g}s"
            )
        if attempt.data is None:
            raise SpanReadError(self.layer_digest, span_no, attempt.cause or "failed")
        return attempt.data

    def in_flight(self, span_no: int) -> Attempt | None:
        """The span's attempt while it is in flight (its data comes on attempt.done)."""
        with self._lock:
            attempt = self._attempts.get(span_no)
            state = self._state(attempt, self.clock.monotonic())
            return attempt if state is SpanState.IN_FLIGHT else None

    def bad_data_failures(self, span_no: int) -> int:
        with self._lock:
            return self._bad_data.get(span_no, 0)

    @staticmethod
    def _state(attempt: Attempt | None, now: float) -> SpanState:
        if attempt is None:
            return SpanState.ABSENT
        if not attempt.done.is_set() and now < attempt.deadline:
            return SpanState.IN_FLIGHT
        if attempt.data is None and now < attempt.fails_fast_until():
            return SpanState.FAILING
        return SpanState.ABSENT
