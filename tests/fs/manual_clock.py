"""A Clock (snapshotter.fs.clock) that moves only when a test moves it.

A test hands it to the span cache, the readers and the background fetcher, then advances it
past a deadline or a quiet period instead of sleeping through one, and waits for the threads
under test to block on it (`wait_for_blocked`) instead of guessing how long they take."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# How often a waiter looks at its event: an event's setter does not know about this clock.
_POLL_S = 0.005


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        # wall clock = monotonic + offset, from the real wall clock now: the activity marks are
        # file mtimes, and the span cache compares temp files' real mtimes with it
        self._wall_offset = time.time() - start
        self._changed = threading.Condition()
        self._deadlines: list[float] = []  # of the threads in wait()

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
            self._deadlines.append(deadline)
            self._changed.notify_all()
        try:
            while not event.wait(_POLL_S):
                with self._changed:
                    if self._now >= deadline:
                        return event.is_set()
            return True
        finally:
            with self._changed:
                self._deadlines.remove(deadline)
                self._changed.notify_all()

    def blocked(self) -> int:
        """Threads in wait() whose deadline this clock has not reached: they stay there until
        their event is set or the clock is advanced."""
        with self._changed:
            return self._blocked()

    def wait_for_blocked(
        self, count: int = 1, *, unless: Callable[[], bool] = lambda: False, timeout: float = 10
    ) -> None:
        """Block (real time) until count threads are blocked on this clock, or unless() holds."""
        give_up = time.monotonic() + timeout
        with self._changed:
            # unless() may change without notice (a thread ending): look again now and then
            while self._blocked() < count and not unless():
                if time.monotonic() >= give_up:
                    raise AssertionError(
                        f"{self._blocked()} threads blocked on the clock after {timeout:g} s, "
                        f"not {count}"
                    )
                self._changed.wait(_POLL_S)

    def _blocked(self) -> int:
        return sum(deadline > self._now for deadline in self._deadlines)
