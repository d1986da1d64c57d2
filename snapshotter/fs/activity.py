"""When any lazy layer of this node last fetched something a container start is waiting on,
and when its mounts were last busy serving one.

Every mount process of a daemon shares one span cache directory; a file there, touched on each
demand miss and each window of a startup-profile prefetch, is the node's "last foreground
fetch" clock. Background fetch waits until the whole node has been quiet, not just its own
layer: the link and the CPU are shared, so one layer's background fetch (a base layer goes
quiet early in a container's start, or finishes its prefetch first) would otherwise slow the
fetches another layer's startup is still waiting on.

A second file is the "last busy" clock: touched when a mount serves a burst of FUSE requests
(a container starting: thousands of lookups and reads a second) even if every byte is already
cached. A profiled start misses nothing, yet its CPU work would share two cores with background
inflating and copying; those wait for it too, but only up to a bound, so a container that
never stops walking its files cannot keep the node from converging. Requests from the node's
own background work (the copy to plain files reads the layer through FUSE, at nice 19) are
left out of the count (low_priority.caller_is_background).

Work that has begun does not run on through a start: background fetch looks at the gate before
each span, the completion check before each chunk it hashes, and the copy's watchdog stops cp
(SIGSTOP) while the gate says wait and lets it go on (SIGCONT) after.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.low_priority import caller_is_background

MARK_NAME = "last-foreground-fetch"
BUSY_MARK_NAME = "last-busy"
# At most one utime() per process this often: reads miss in bursts, and a quiet period is
# seconds long, so a quarter second of staleness does not matter.
NOTE_INTERVAL_S = 0.25
# A mount is busy when it serves this many FUSE requests within BUSY_WINDOW_S: a cold
# container start sends thousands a second; a warm one (everything cached, the kernel holding
# entries and attributes) still lists each package directory it imports from: pybig's
# `import numpy, pandas` reaches the mounts' Python code ~95 times in 0.3 s, mostly on one
# layer. A long-running service reading now and then sends a few.
BUSY_REQUESTS = 16
BUSY_WINDOW_S = 0.25
# How often paused work looks at the gate again: it goes on this soon after the node is quiet.
BUSY_POLL_S = 0.1
# Longest a busy node (requests served from cache, no fetches) holds background work back:
# containers that keep walking their files must not keep the node from converging.
MAX_BUSY_DEFERRAL_S = 120.0


class _Mark:
    """A file whose mtime is a node-wide clock, touched at most every NOTE_INTERVAL_S."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._last_noted = -math.inf  # monotonic
        self._lock = threading.Lock()

    def note(self) -> None:
        now = self._clock.monotonic()
        with self._lock:
            if now - self._last_noted < NOTE_INTERVAL_S:
                return
            self._last_noted = now
        wall = self._clock.time()
        try:
            os.utime(self.path, (wall, wall))
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                self.path.touch(mode=0o600)  # empty, but ours: 0600 like every file
                os.utime(self.path, (wall, wall))
        except OSError:
            pass  # a read-only or full cache disk: the layer's own clock still works

    def seconds_since(self) -> float:
        """Wall-clock seconds since any process last noted it (inf if never)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return math.inf
        return max(0.0, self._clock.time() - mtime)


class NodeActivity:
    def __init__(self, cache_dir: str | os.PathLike[str], clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._fetch = _Mark(Path(cache_dir) / MARK_NAME, clock)
        self._busy = _Mark(Path(cache_dir) / BUSY_MARK_NAME, clock)

    @property
    def path(self) -> Path:
        return self._fetch.path

    def note_foreground_fetch(self) -> None:
        self._fetch.note()

    def seconds_since_foreground_fetch(self) -> float:
        """Wall-clock seconds since any layer's last foreground fetch (inf if none yet)."""
        return self._fetch.seconds_since()

    def note_busy(self) -> None:
        self._busy.note()

    def seconds_since_busy(self) -> float:
        """Wall-clock seconds since any mount last served a burst of requests (inf if never)."""
        return self._busy.seconds_since()


class BusyMeter:
    """Counts a mount's FUSE requests; notes the node busy when they come in a burst.

    `tick(caller_pid)` runs on every request, so it is a clock read, two compares and (once
    per caller and window) a getpriority(): requests of the node's own background work, such
    as the copy's cp, do not count. Races between request threads only blur a count that is a
    heuristic anyway."""

    def __init__(
        self,
        activity: NodeActivity,
        is_background: Callable[[int], bool] = caller_is_background,
    ) -> None:
        self._activity = activity
        self._clock = activity.clock
        self._is_background = is_background
        self._window_start = -math.inf
        self._count = 0
        self._background_callers: dict[int, bool] = {}  # this window's answers

    def tick(self, caller_pid: int = 0) -> None:
        now = self._clock.monotonic()
        if now - self._window_start > BUSY_WINDOW_S:
            self._window_start = now
            self._count = 0
            self._background_callers = {}
        background = self._background_callers.get(caller_pid)
        if background is None:
            background = self._background_callers[caller_pid] = self._is_background(caller_pid)
        if background:
            return
        self._count += 1
        if self._count >= BUSY_REQUESTS:
            self._activity.note_busy()  # rate-limited: cheap to call on every later request


class BusyGate:
    """Whether background work (fetching the rest of a layer, copying it to plain files) may
    go on as far as the node's busy clock is concerned: not until no mount has served a burst
    for `quiet_seconds`, but never deferred longer than MAX_BUSY_DEFERRAL_S in a row.
    fetches: also not until no layer has fetched for a start for `quiet_seconds` (that wait
    has no bound: a start that fetches ends)."""

    def __init__(
        self, activity: NodeActivity, quiet_seconds: float, *, fetches: bool = False
    ) -> None:
        self._activity = activity
        self._quiet_seconds = quiet_seconds
        self._fetches = fetches
        self._deferring_since: float | None = None  # monotonic

    def remaining(self) -> float:
        """Seconds still to wait (<= 0: go on)."""
        if self._fetches:
            fetching = self._quiet_seconds - self._activity.seconds_since_foreground_fetch()
            if fetching > 0:
                return fetching
        remaining = self._quiet_seconds - self._activity.seconds_since_busy()
        now = self._activity.clock.monotonic()
        if remaining <= 0:
            self._deferring_since = None
            return remaining
        if self._deferring_since is None:
            self._deferring_since = now
        if now - self._deferring_since >= MAX_BUSY_DEFERRAL_S:
            return 0.0  # busy without pause for too long: go on anyway, at low priority
        return remaining

    def pause_while_busy(self, stop: threading.Event) -> bool:
        """Block while remaining() > 0, looking again every BUSY_POLL_S of the activity's
        clock; False if stop was set first. Work calls it between its chunks."""
        while not stop.is_set():
            remaining = self.remaining()
            if remaining <= 0:
                return True
            self._activity.clock.wait(stop, min(remaining, BUSY_POLL_S))
        return False
