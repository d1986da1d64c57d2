"""The time the mount process's read path goes by, passed in rather than read deep inside.

Fail-fast windows, fetch deadlines, background pacing and the node's activity marks all measure
time through a Clock, so a test can move time on by hand instead of sleeping through it.
SYSTEM_CLOCK is the real one, which the mount process uses.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: deadlines and intervals."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch: compared with file mtimes other processes set."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until event is set (True) or timeout seconds of this clock passed (False)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


SYSTEM_CLOCK: Clock = SystemClock()
