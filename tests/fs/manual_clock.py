"""A Clock (snapshotter.fs.clock) that moves only when a test moves it.

A test hands it to the span cache, the reader and the background fetcher, then advances it
past a deadline or a quiet period instead of sleeping through one, and waits for the threads
under test to block on it (`wait_for_waiters`) instead of guessing how long they take."""

from __future__ import annotations

import threading
import time

# How often a waiter looks at its event: an event's setter does not know about this clock.
_POLL_S = 0.005


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        # wall clock = monotonic + offset, from the real wall clock now: the activity marks are
        # file mtimes, and the span cache compares temp files' real mtimes with it
        self._wall_offset = time.time() - start
        self._changed = threading.Condition()
        self._waiters = 0

    def monotonic(self) -> float:
        with self._changed:
            return self._now

    def time(self) -> float:
        with self._changed:
            return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        with self._changed:
            self._now += seconds
            self._changed.notify_all()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        with self._changed:
            deadline = self._now + timeout
            self._waiters += 1
            self._changed.notify_all()
        try:
            while not event.wait(_POLL_S):
                with self._changed:
                    if self._now >= deadline:
                        return event.is_set()
            return True
        finally:
            with self._changed:
                self._waiters -= 1
                self._changed.notify_all()

    def waiters(self) -> int:
        """Threads blocked in wait() right now."""
        with self._changed:
            return self._waiters

    def wait_for_waiters(self, count: int, timeout: float = 10.0) -> None:
        """Block (real time) until at least count threads wait on this clock."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._waiters >= count, timeout):
                raise AssertionError(
                    f"{self._waiters} threads waiting on the clock after {timeout:g}s, not {count}"
                )
