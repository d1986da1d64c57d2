"""When any lazy layer of this node last fetched something a container start is waiting on.

Every mount process of a daemon shares one span cache directory; a file there, touched on each
demand miss and each window of a startup-profile prefetch, is the node's "last foreground
fetch" clock. Background fetch waits until the whole node has been quiet, not just its own
layer: the link and the CPU are shared, so one layer's background fetch (a base layer goes
quiet early in a container's start, or finishes its prefetch first) would otherwise slow the
fetches another layer's startup is still waiting on.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path

MARK_NAME = "last-foreground-fetch"
# At most one utime() per process this often: reads miss in bursts, and a quiet period is
# seconds long, so a quarter second of staleness does not matter.
NOTE_INTERVAL_S = 0.25


class NodeActivity:
    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.path = Path(cache_dir) / MARK_NAME
        self._last_noted = -math.inf  # monotonic
        self._lock = threading.Lock()

    def note_foreground_fetch(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_noted < NOTE_INTERVAL_S:
                return
            self._last_noted = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                self.path.touch()
        except OSError:
            pass  # a read-only or full cache disk: the layer's own clock still works

    def seconds_since_foreground_fetch(self) -> float:
        """Wall-clock seconds since any layer's last foreground fetch (inf if none yet)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return math.inf
        return max(0.0, time.time() - mtime)
