"""Background fetch: after a quiet period, fetch the rest of a layer at a bounded rate, so a node
converges to having every lazily mounted layer fully local.

One low-priority thread per mount (nice 19, idle I/O class, named lazysnap-bg:
low_priority.py). It only works while the node is quiet (no read of any layer sharing the span
cache has had to go to the network for `quiet_seconds`, no
startup-profile prefetch of this layer is running, and no mount of the node has served a burst
of FUSE requests for `quiet_seconds`, which yields to a busy node for at most
`activity.MAX_BUSY_DEFERRAL_S`; it looks again before every span, so a container that starts
meanwhile waits for one span at most), fetches one span per request in layer order
on its own thread (on-demand reads keep the reader's workers and never queue behind it), paces
itself to `rate_bytes` compressed bytes per second, and stops for good when every span is cached
or when the next span would push the shared cache past `CACHE_HIGH_WATER` of its bound, or its
filesystem into the cache's disk reserve: filling a bounded cache would only evict spans
someone needed.

A span whose bytes do not fit the index (they do not verify, or the index points outside the
blob) is given up on after MAX_BAD_DATA_FAILURES tries: trying again gets the same bytes. The
layer then ends `degraded` rather than `complete` (status and metrics show it; reads of that
span keep failing with EIO, every other span is served). A failure that may pass (registry
down, timeout) is retried after a pause that doubles up to MAX_ERROR_BACKOFF_S, so a registry
that is gone for long costs a request every few minutes, not a stream of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import StrEnum

from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.low_priority import lower_this_thread
from snapshotter.fs.reader import LayerReader

log = logging.getLogger("lazysnap.fs")

CACHE_HIGH_WATER = 0.9  # of the cache bound; above it background fetch stops
DEFAULT_QUIET_S = 5.0
DEFAULT_RATE_BYTES = 32 << 20
ERROR_BACKOFF_S = 5.0  # after a failed span: the registry may be down, do not hammer it
MAX_ERROR_BACKOFF_S = 300.0
MAX_BAD_DATA_FAILURES = 3


class BackgroundState(StrEnum):
    WAITING = "waiting"  # for the layer to be quiet
    FETCHING = "fetching"
    COMPLETE = "complete"  # every span cached
    DEGRADED = "degraded"  # every span cached but those whose bytes never verified
    CACHE_FULL = "cache-full"  # stopped at the cache's high-water mark
    STOPPED = "stopped"  # mount going away


@dataclass(frozen=True)
class BackgroundSettings:
    enabled: bool = True
    quiet_seconds: float = DEFAULT_QUIET_S
    rate_bytes: int = DEFAULT_RATE_BYTES  # compressed bytes per second

    def __post_init__(self) -> None:
        if self.quiet_seconds < 0:
            raise ValueError(f"background quiet_seconds must be >= 0, not {self.quiet_seconds}")
        if self.rate_bytes <= 0:
            raise ValueError(f"background rate_bytes must be > 0, not {self.rate_bytes}")


class BackgroundFetcher(threading.Thread):
    def __init__(
        self,
        reader: LayerReader,
        settings: BackgroundSettings,
    ) -> None:
        super().__init__(name="background-fetch", daemon=True)
        self.reader = reader
        self.settings = settings
        self.state = BackgroundState.WAITING
        self._stop_event = threading.Event()
        self._busy = BusyGate(
            NodeActivity(reader.cache.directory, reader.clock), settings.quiet_seconds
        )

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        # Lowest CPU and I/O priority for this thread only (Linux keeps both per thread): its
        # inflating must not slow a container that is starting. It holds the GIL little (zlib
        # and sha256 release it), so FUSE threads of this process do not wait behind it.
        lower_this_thread("lazysnap-bg")
        try:
            self.state = self._work()
        except Exception:  # never take the mount down: on-demand reads still work
            log.exception("background fetch of %s failed", self.reader.layer_digest)
            self.state = BackgroundState.STOPPED
        log.info("background fetch of %s: %s", self.reader.layer_digest, self.state)

    def _work(self) -> BackgroundState:
        spans = self.reader.index.spans
        cache = self.reader.cache
        next_span = 0
        given_up = 0
        backoff = ERROR_BACKOFF_S
        while next_span < len(spans):
            if not self._wait_until_quiet():
                return BackgroundState.STOPPED
            if self.reader.is_cached(next_span):
                next_span += 1
                continue
            room = min(
                cache.max_bytes * CACHE_HIGH_WATER - cache.approximate_usage().bytes,
                cache.disk_room(),  # a disk at its reserve: filling would only evict
            )
            if cache.stored_size(spans[next_span].uncompressed_size) > room:
                return BackgroundState.CACHE_FULL
            self.state = BackgroundState.FETCHING
            started = self.reader.clock.monotonic()
            errors_before = self.reader.counters().fetch_errors
            fetched = self.reader.fetch_in_background(next_span)
            if self.reader.counters().fetch_errors > errors_before:
                if self.reader.bad_data_failures(next_span) >= MAX_BAD_DATA_FAILURES:
                    log.warning(
                        "background fetch of %s: giving up on span %d, whose bytes do not fit "
                        "the index after %d tries (reads of it fail with EIO; the layer's "
                        "index or blob is wrong: rebuild the index)",
                        self.reader.layer_digest,
                        next_span,
                        MAX_BAD_DATA_FAILURES,
                    )
                    self.reader.mark_degraded(next_span)
                    given_up += 1
                    next_span += 1
                    continue
                if self._wait_for_stop(backoff):
                    return BackgroundState.STOPPED
                backoff = min(MAX_ERROR_BACKOFF_S, backoff * 2)
                continue  # retry the same span (a read may have fetched it meanwhile)
            backoff = ERROR_BACKOFF_S
            next_span += 1
            # Pace: fetched bytes at `rate` would have taken this long.
            pause = fetched / self.settings.rate_bytes - (self.reader.clock.monotonic() - started)
            if pause > 0 and self._wait_for_stop(pause):
                return BackgroundState.STOPPED
        return BackgroundState.DEGRADED if given_up else BackgroundState.COMPLETE

    def _wait_for_stop(self, seconds: float) -> bool:
        """True if stopped within seconds (of the reader's clock)."""
        return self.reader.clock.wait(self._stop_event, seconds)

    def _wait_until_quiet(self) -> bool:
        """True once the node has been quiet for quiet_seconds; False if stopped first."""
        while not self._stop_event.is_set():
            remaining = self.settings.quiet_seconds - self.reader.idle_seconds()
            if remaining <= 0:
                remaining = self._busy.remaining()
                if remaining <= 0:
                    return True
            self.state = BackgroundState.WAITING
            self._wait_for_stop(min(remaining, 0.5))
        return False
