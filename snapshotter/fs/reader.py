"""Reads of one layer's files: file range -> uncompressed range -> spans -> cache or fetch.

A missing span is fetched with one Range request (adjacent missing spans of one read share a
request), inflated and verified by the index package on a worker thread, stored in the span
cache and only then served. Concurrent readers of one span share one fetch attempt, so the span
is fetched once; readers of other spans never wait for it.

Read-ahead: when the reads of a file move forward span by span (a read reaches the span right
after the furthest span the file's previous reads reached), the next spans of that file that are
neither cached nor in flight are fetched ahead, as one Range request per contiguous run, on the
same workers, so the inflate of the next spans overlaps serving this one. The window grows as
the kernel's does (2, 4, 8 ... up to read_ahead_spans, and at most READ_AHEAD_MAX_BYTES
compressed) and the next window starts when the reads are half-way through the last one. A read
that jumps elsewhere starts over, so a random pattern fetches nothing it does not read. A
read-ahead fetch that fails quickly is not remembered: a read that joined it fetches the span
again on demand, and reads of other spans never see it.

Windows: a gzip index of format version 2 keeps the spans' 32 KiB windows in a windows blob
(snapshotter.index.codec). The windows of a group of consecutive spans are one contiguous range
there, fetched as one more Range request on a small pool of its own, at the same time as the
group's data, so it adds no round trip. A window that cannot be fetched or decoded fails its
span (SpanReadError naming the windows blob); a wrong one fails the span's digest check.

An attempt has a deadline, fetch_timeout after it started, and nobody waits on it past that: a
reader that joins an attempt late gets its data or SpanReadError (fuse_ops: EIO) by the same
deadline, so one read costs at most one fetch timeout even when the kernel sends it as several
FUSE requests (readahead, then the read of the page that readahead failed to fill). An attempt
that ran out of time, or failed slowly, is remembered for RETRY_AFTER_FAILURE_S: requests for
its spans in that window do not start a fetch that a hung registry would hold for a whole
timeout again. They fail at once, or, while the attempt's thread is still waiting on the
registry, after giving it LATE_RESULT_GRACE_S to answer (a registry that resumes answers the
old request first). After the window, the next read starts a new attempt even if the old one's
thread is still stuck; a late result of that thread that verifies is cached and also serves the
new attempt's readers. A quick failure (connection refused, bytes that do not verify) is not
remembered: trying again costs little, and the registry may be back already.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from typing import Protocol

from snapshotter.fs.activity import NodeActivity
from snapshotter.fs.cache import CacheError, SpanCache
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.index.codec import decode_window
from snapshotter.index.errors import SpanVerificationError
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range, inflate_span, spans_for_range
from snapshotter.remote.errors import BlobFetchError

DEFAULT_WORKERS = 4
DEFAULT_FETCH_TIMEOUT_S = 30.0
# Cap on one coalesced Range request, so one huge read does not hold a worker for long.
MAX_COALESCED_BYTES = 32 << 20
# The prefetch claims spans a step at a time (so reads never wait behind a long claimed list)
# and keeps two steps' requests in flight: one transfers while the next one's round trip and
# the last one's inflate happen, which keeps a slow link busy.
PREFETCH_STEP_BYTES = 2 << 20  # compressed
PREFETCH_IN_FLIGHT = 2
DEFAULT_READ_AHEAD_SPANS = 8  # largest read-ahead window, in spans; 0 turns read-ahead off
READ_AHEAD_FIRST_WINDOW = 2  # spans fetched ahead at the first sign of a sequential read
# Cap on one read-ahead window (compressed bytes): on a slow link, a window is what a read that
# jumps elsewhere may have to share the link with.
READ_AHEAD_MAX_BYTES = 8 << 20
# Files whose read position is remembered for read-ahead (the least recently read is dropped).
READ_AHEAD_STREAMS = 64
# Reads arrive on several FUSE threads, the kernel's own readahead several spans at once, so a
# read up to this many spans behind the furthest one is still part of the stream (not a jump).
READ_AHEAD_REORDER_SPANS = 8
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


class BlobSource(Protocol):
    """The compressed layer blob. One call is one Range read; it raises on failure (for the
    registry reader: snapshotter.remote.errors.BlobFetchError) and must give up on its own
    within the fetch timeout it was built with."""

    def read(self, offset: int, length: int) -> bytes: ...


class SpanReadError(Exception):
    """A span could not be fetched or did not verify. Never accompanied by data."""

    def __init__(self, layer_digest: str, span_no: int, cause: str) -> None:
        super().__init__(f"layer {layer_digest} span {span_no}: {cause}")
        self.layer_digest = layer_digest
        self.span_no = span_no
        self.cause = cause


@dataclass
class ReaderCounters:
    bytes_fetched: int = 0  # compressed bytes received from the blob source
    range_requests: int = 0
    spans_fetched: int = 0  # spans inflated and verified
    spans_cached: int = 0  # spans written to the cache
    cache_hits: int = 0  # span reads served from the cache
    fetch_errors: int = 0  # spans whose fetch or verification failed
    demand_misses: int = 0  # reads that found a span neither cached nor in flight
    prefetch_spans: int = 0  # spans fetched for the startup profile
    background_spans: int = 0  # spans fetched by the background fetcher
    background_bytes: int = 0  # compressed bytes of those
    readahead_spans: int = 0  # spans whose fetch read-ahead started before a read needed them
    # compressed bytes of the distinct spans this process verified: never more than the layer
    # (bytes_fetched counts every attempt, failed ones and re-fetches after eviction too)
    bytes_verified: int = 0
    degraded_spans: int = 0  # spans background fetch gave up on: their bytes never verified

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Attempt:
    """One fetch of one span, shared by every reader of the span until it ends."""

    future: Future[bytes]
    started: float  # monotonic
    deadline: float  # started + fetch_timeout: nobody waits on it longer
    ended: float = math.inf  # monotonic time its fetch failed, if it did
    read_ahead: bool = False  # started by read-ahead: no read needed the span yet
    done: threading.Event = field(default_factory=threading.Event)  # set once future is

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _: self.done.set())

    def failed_quickly(self) -> bool:
        """It failed and a new attempt may start at once (see fails_fast_until)."""
        return self.future.done() and self.fails_fast_until() <= self.ended

    def fails_fast_until(self) -> float:
        """Until when requests of its spans fail at once rather than start a new attempt;
        meaningful once it failed or ran out of time."""
        failed_at = min(self.ended, self.deadline)  # when its readers were told
        if failed_at - self.started < SLOW_FAILURE_FRACTION * (self.deadline - self.started):
            return failed_at
        return failed_at + RETRY_AFTER_FAILURE_S


class WindowFetchError(Exception):
    """A span's window could not be fetched from the windows blob or is not a valid frame."""


@dataclass(frozen=True)
class _WindowsFetch:
    """The windows of one fetch group: windows blob bytes from `begin`, once fetched."""

    begin: int
    future: Future[bytes]


@dataclass
class _Stream:
    """Where the reads of one file got to, for read-ahead."""

    furthest_span: int  # the highest span any read of the stream touched
    window: int  # spans the last read-ahead window held; the next holds twice as many
    ahead_until: int  # the last span read ahead so far (furthest_span: none yet)


class LayerReader:
    def __init__(
        self,
        index: LayerIndex,
        blob: BlobSource,
        cache: SpanCache,
        *,
        workers: int = DEFAULT_WORKERS,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S,
        read_ahead_spans: int = DEFAULT_READ_AHEAD_SPANS,
        windows: BlobSource | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`windows` reads the index's windows blob; required when index.windows names one."""
        if (windows is None) != (index.windows is None):
            raise ValueError(
                f"layer {index.layer_digest}: a windows blob source is needed exactly when the "
                "index keeps its windows in a windows blob"
            )
        if workers < 1:
            raise ValueError(f"layer {index.layer_digest}: workers must be >= 1, not {workers}")
        if read_ahead_spans < 0:
            raise ValueError(
                f"layer {index.layer_digest}: read_ahead_spans must be >= 0, not {read_ahead_spans}"
            )
        if fetch_timeout <= 0:
            raise ValueError(
                f"layer {index.layer_digest}: fetch_timeout must be > 0, not {fetch_timeout}"
            )
        self.index = index
        self.blob = blob
        self.windows = windows
        self.cache = cache
        self.clock = clock
        self.fetch_timeout = fetch_timeout
        self.read_ahead_spans = read_ahead_spans
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="span-fetch")
        self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._prefetch_fetch_pool = ThreadPoolExecutor(
            max_workers=PREFETCH_IN_FLIGHT, thread_name_prefix="prefetch-fetch"
        )
        # One windows fetch per group fetch at most, and each group's fetch waits for its own:
        # a thread per fetching thread (span workers, prefetch fetches, background fetcher)
        # means a windows request never queues behind another group's.
        self._windows_pool = (
            ThreadPoolExecutor(
                max_workers=workers + PREFETCH_IN_FLIGHT + 1, thread_name_prefix="window-fetch"
            )
            if windows is not None
            else None
        )
        self._closed = False
        self._lock = threading.Lock()
        # Span number -> its current fetch attempt: running, or failed and still failing fast.
        self._attempts: dict[int, _Attempt] = {}
        self._counters = ReaderCounters()
        # When a read last had to go to the network, and how many prefetch lists are still
        # running: the background fetcher waits for both to go quiet.
        self._last_demand_miss = self.clock.monotonic()
        self._prefetches_running = 0
        self._node_activity = NodeActivity(cache.directory, clock)  # every layer sharing the cache
        # File data offset -> its read stream, least recently read first.
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self._verified_spans: set[int] = set()  # for bytes_verified
        # Span number -> failures in which the registry's answer did not fit the index (bytes
        # that do not verify, a range outside the blob): trying again will not help.
        self._bad_data: dict[int, int] = {}
        self._degraded: set[int] = set()

    @property
    def layer_digest(self) -> str:
        return self.index.layer_digest

    def counters(self) -> ReaderCounters:
        with self._lock:
            return ReaderCounters(**self._counters.as_dict())

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
        self._prefetch_fetch_pool.shutdown(wait=False, cancel_futures=True)
        if self._windows_pool is not None:
            self._windows_pool.shutdown(wait=False, cancel_futures=True)

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes:
        """Up to size bytes of entry's data from offset (fewer at end of file)."""
        if offset < 0 or size < 0:
            raise ValueError(f"{entry.name}: negative offset {offset} or size {size}")
        start = entry.offset + min(offset, entry.size)
        end = entry.offset + min(offset + size, entry.size)
        if start >= end:
            return b""
        span_numbers = list(spans_for_range(self.index, start, end))
        pieces: dict[int, bytes] = {}
        waiting: dict[int, tuple[_Attempt, float]] = {}
        missing: list[int] = []
        for span_no in span_numbers:
            lo, hi = self._slice(span_no, start, end)
            found = self._cached_or_claimed(span_no, lo, hi)
            if isinstance(found, bytes):
                pieces[span_no] = found
                continue
            attempt, is_new, wait_until = found
            waiting[span_no] = (attempt, wait_until)
            if is_new:
                missing.append(span_no)
        if missing:
            self._note_demand_miss()
        for group in self._coalesce(missing):
            self._pool.submit(self._fetch_group, [(n, waiting[n][0]) for n in group])
        if self.read_ahead_spans:
            # after the read's own fetches: the workers take those first
            self._read_ahead(entry, span_numbers[0], span_numbers[-1])
        for span_no, (attempt, wait_until) in waiting.items():
            lo, hi = self._slice(span_no, start, end)
            pieces[span_no] = self._wait_or_refetch(span_no, attempt, wait_until)[lo:hi]
        return b"".join(pieces[span_no] for span_no in span_numbers)

    def prefetch(self, span_numbers: Iterable[int]) -> None:
        """Fetch spans in the background, in order; returns at once.

        One background thread works through the list a step (PREFETCH_STEP_BYTES) at a time,
        with PREFETCH_IN_FLIGHT steps' requests out at once on threads of their own, and claims
        a span only when it is about to fetch it, so reads never queue behind the prefetch list:
        they fetch on the regular workers whatever the prefetch has not claimed yet."""
        with self._lock:
            self._prefetches_running += 1
        self._prefetch_pool.submit(self._prefetch, list(span_numbers))

    def idle_seconds(self) -> float:
        """Seconds since a read of this layer last missed, or any layer sharing its cache last
        missed or prefetched; -inf while this layer's prefetch list is still running."""
        with self._lock:
            if self._prefetches_running:
                return -math.inf
            own = self.clock.monotonic() - self._last_demand_miss
        return min(own, self._node_activity.seconds_since_foreground_fetch())

    def bad_data_failures(self, span_no: int) -> int:
        """How often the span's bytes did not fit the index (see _is_bad_data)."""
        with self._lock:
            return self._bad_data.get(span_no, 0)

    def mark_degraded(self, span_no: int) -> None:
        """Background fetch gave up on the span: counted for status and metrics (reads still
        try it, and get EIO while its bytes do not verify)."""
        with self._lock:
            if span_no not in self._degraded:
                self._degraded.add(span_no)
                self._counters.degraded_spans += 1

    def is_cached(self, span_no: int) -> bool:
        return self.cache.contains(self.layer_digest, span_no, self._digest(span_no))

    def fetch_in_background(self, span_no: int) -> int:
        """Fetch one span on the caller's thread unless it is cached or in flight already;
        the compressed bytes fetched (0 if nothing was needed). Errors are counted, not raised:
        the span stays missing and a later read fetches it on demand."""
        attempt, is_new, _ = self._claim(span_no)
        if attempt is None or not is_new:
            return 0
        self._fetch_group([(span_no, attempt)])
        begin, end = fetch_range(self.index, span_no)
        if attempt.future.exception() is not None:
            return 0
        fetched = end - begin
        if self.index.windows is not None:  # its window came from the windows blob too
            fetched += self.index.spans[span_no].window_length
        with self._lock:
            self._counters.background_spans += 1
            self._counters.background_bytes += fetched
        return fetched

    # -- internals -----------------------------------------------------------------------------

    def _cached_or_claimed(
        self, span_no: int, lo: int, hi: int
    ) -> bytes | tuple[_Attempt, bool, float]:
        """Bytes [lo, hi) of the span from the cache, or the attempt to wait on (see _claim)."""
        cached = self._from_cache(span_no, lo, hi)
        if cached is not None:
            return cached
        attempt, is_new, wait_until = self._claim(span_no)
        if attempt is None:  # stored by someone else between the two looks
            cached = self._from_cache(span_no, lo, hi)
            if cached is not None:
                return cached
            attempt, is_new, wait_until = self._claim(span_no, force=True)
            assert attempt is not None
        return attempt, is_new, wait_until

    def _note_demand_miss(self) -> None:
        with self._lock:
            self._counters.demand_misses += 1
            self._last_demand_miss = self.clock.monotonic()
        self._node_activity.note_foreground_fetch()

    def _wait_or_refetch(self, span_no: int, attempt: _Attempt, wait_until: float) -> bytes:
        """The whole span: from the attempt, or, if it was a read-ahead that failed quickly,
        from one fetch on demand (the read-ahead's failure is not this read's)."""
        try:
            return self._wait(span_no, attempt, wait_until)
        except SpanReadError:
            if not (attempt.read_ahead and attempt.failed_quickly()):
                raise
        span = self.index.spans[span_no]
        found = self._cached_or_claimed(span_no, 0, span.uncompressed_size)
        if isinstance(found, bytes):
            return found
        retry, is_new, retry_until = found
        if is_new:
            self._note_demand_miss()
            self._pool.submit(self._fetch_group, [(span_no, retry)])
        return self._wait(span_no, retry, retry_until)

    def _read_ahead(self, entry: TocEntry, first: int, last: int) -> None:
        """Fetch ahead of a read of entry's spans [first, last] if the file's reads move
        forward span by span (module docstring)."""
        claimed: dict[int, _Attempt] = {}
        for span_no in self._read_ahead_window(entry, first, last):
            attempt, is_new, _ = self._claim(span_no)
            if attempt is not None and is_new:
                attempt.read_ahead = True
                claimed[span_no] = attempt
        if not claimed:
            return
        # The background fetcher waits for read-ahead as it waits for the misses it replaces.
        with self._lock:
            self._counters.readahead_spans += len(claimed)
            self._last_demand_miss = self.clock.monotonic()
        self._node_activity.note_foreground_fetch()
        for group in self._coalesce(list(claimed)):
            self._pool.submit(self._fetch_group, [(n, claimed[n]) for n in group])

    def _read_ahead_window(self, entry: TocEntry, first: int, last: int) -> range:
        """The spans to fetch ahead after a read of entry's spans [first, last], cached or
        not; updates the file's stream."""
        key = entry.offset
        with self._lock:
            stream = self._streams.get(key)
            if stream is not None:
                self._streams.move_to_end(key)
            if (
                stream is None
                or first > stream.furthest_span + 1
                or last < stream.furthest_span - READ_AHEAD_REORDER_SPANS
            ):
                # a new file, or a jump: start over from here, nothing ahead yet
                self._streams[key] = _Stream(last, READ_AHEAD_FIRST_WINDOW // 2, last)
                if len(self._streams) > READ_AHEAD_STREAMS:
                    self._streams.popitem(last=False)
                return range(0)
            if last <= stream.furthest_span:
                return range(0)  # a re-read, or a late one: no step forward
            stream.furthest_span = last
            if stream.ahead_until - last > stream.window // 2:
                return range(0)  # not yet half-way through the last window
            begin = max(stream.ahead_until, last) + 1
            stop = min(
                begin + min(stream.window * 2, self.read_ahead_spans),
                spans_for_range(self.index, entry.offset, entry.offset + entry.size).stop,
            )
            budget = READ_AHEAD_MAX_BYTES
            for span_no in range(begin, stop):
                budget -= self.index.spans[span_no].compressed_size
                if budget < 0 and span_no > begin:
                    stop = span_no
                    break
            if begin >= stop:
                return range(0)
            stream.ahead_until = stop - 1
            stream.window = stop - begin
            return range(begin, stop)

    def _prefetch(self, span_numbers: list[int]) -> None:
        slots = threading.BoundedSemaphore(PREFETCH_IN_FLIGHT)
        in_flight: list[Future[None]] = []
        try:
            position = 0
            while position < len(span_numbers) and not self._closed:
                slots.acquire()  # claim a step only when its requests can go out at once
                step, position = self._prefetch_step(span_numbers, position)
                claimed: dict[int, _Attempt] = {}
                for span_no in step:
                    attempt, is_new, _ = self._claim(span_no)
                    if attempt is not None and is_new:
                        claimed[span_no] = attempt
                if not claimed:
                    slots.release()
                    continue
                self._node_activity.note_foreground_fetch()  # other layers wait for it
                groups = [
                    [(n, claimed[n]) for n in group] for group in self._coalesce(list(claimed))
                ]
                try:
                    future = self._prefetch_fetch_pool.submit(self._fetch_groups, groups)
                except RuntimeError:  # closed meanwhile: nobody fetches these any more
                    slots.release()
                    for span_no, attempt in claimed.items():
                        self._fail(span_no, attempt, "the layer's reader was closed")
                    return
                future.add_done_callback(lambda _: slots.release())
                in_flight = [f for f in in_flight if not f.done()] + [future]
            futures_wait(in_flight)  # the list counts as running until its last span is in
        finally:
            with self._lock:
                self._prefetches_running -= 1

    def _fetch_groups(self, groups: list[list[tuple[int, _Attempt]]]) -> None:
        """Prefetch worker: the groups of one step, one after another."""
        for group in groups:
            self._fetch_group(group)
        with self._lock:  # counted once done: status shows what the prefetch has brought in
            self._counters.prefetch_spans += sum(len(group) for group in groups)

    def _prefetch_step(self, span_numbers: list[int], position: int) -> tuple[list[int], int]:
        """The next spans of the list from position, PREFETCH_STEP_BYTES of them (at least
        one), and where the step after starts."""
        step: list[int] = []
        size = 0
        while position < len(span_numbers) and (not step or size < PREFETCH_STEP_BYTES):
            span_no = span_numbers[position]
            begin, end = fetch_range(self.index, span_no)
            step.append(span_no)
            size += end - begin
            position += 1
        return step, position

    def _digest(self, span_no: int) -> str:
        return self.index.spans[span_no].uncompressed_digest

    def _slice(self, span_no: int, start: int, end: int) -> tuple[int, int]:
        span = self.index.spans[span_no]
        lo = max(start, span.uncompressed_start) - span.uncompressed_start
        hi = min(end, span.uncompressed_end) - span.uncompressed_start
        return lo, hi

    def _from_cache(self, span_no: int, lo: int, hi: int) -> bytes | None:
        span = self.index.spans[span_no]
        data = self.cache.read(
            self.layer_digest,
            span_no,
            lo,
            hi - lo,
            span.uncompressed_size,
            span.uncompressed_digest,
        )
        if data is not None:
            with self._lock:
                self._counters.cache_hits += 1
        return data

    def _claim(self, span_no: int, *, force: bool = False) -> tuple[_Attempt | None, bool, float]:
        """The attempt a reader of span_no waits on, and whether this caller created it (and so
        must fetch). That is the running attempt while it is within its deadline, or a failed one
        while it still fails fast (after a slow failure); else a new one. The third value is
        until when the caller waits for it. Returns (None, False, 0) when the span reached the
        cache meanwhile."""
        now = self.clock.monotonic()
        with self._lock:
            attempt = self._attempts.get(span_no)
            if attempt is not None:
                if not attempt.future.done() and now < attempt.deadline:
                    return attempt, False, attempt.deadline
                if now < attempt.fails_fast_until():
                    stuck = not attempt.future.done()
                    return attempt, False, now + LATE_RESULT_GRACE_S if stuck else now
                # over: a thread still stuck on it finishes on its own, unwaited
            if not force and self.cache.contains(self.layer_digest, span_no, self._digest(span_no)):
                return None, False, 0.0
            attempt = _Attempt(Future(), now, now + self.fetch_timeout)
            self._attempts[span_no] = attempt
            return attempt, True, attempt.deadline

    def _wait(self, span_no: int, attempt: _Attempt, wait_until: float) -> bytes:
        """The span's bytes, or SpanReadError by wait_until."""
        if not self.clock.wait(attempt.done, wait_until - self.clock.monotonic()):
            raise SpanReadError(
                self.layer_digest, span_no, f"no data within {self.fetch_timeout:g}s"
            )
        # exception(), not result(): raising the stored exception would attach this
        # frame (and the bytes it holds) to it for as long as the attempt is remembered
        failure = attempt.future.exception()
        if failure is not None:
            cause = failure.cause if isinstance(failure, SpanReadError) else str(failure)
            raise SpanReadError(self.layer_digest, span_no, cause)
        return attempt.future.result()

    def _coalesce(self, span_numbers: Sequence[int]) -> list[list[int]]:
        groups: list[list[int]] = []
        for span_no in sorted(span_numbers):
            if groups:
                last = groups[-1]
                first_span = self.index.spans[last[0]]
                span = self.index.spans[span_no]
                if (
                    span_no == last[-1] + 1
                    and span.compressed_end - first_span.compressed_start <= MAX_COALESCED_BYTES
                ):
                    last.append(span_no)
                    continue
            groups.append([span_no])
        return groups

    def _fetch_group(self, group: list[tuple[int, _Attempt]]) -> None:
        """Worker: one Range request for the group, then inflate + verify + cache each span.
        Every attempt of the group is resolved whatever happens."""
        now = self.clock.monotonic()
        group = [(n, a) for n, a in group if not a.future.done()]  # served by a late fetch
        late = [(n, a) for n, a in group if now >= a.deadline]
        for span_no, attempt in late:
            # queued behind busy workers until its readers gave up: it ends here, and a later
            # read starts a fresh attempt, rather than piling requests onto a slow registry
            self._fail(span_no, attempt, f"not started within {self.fetch_timeout:g}s")
        group = [(n, a) for n, a in group if now < a.deadline]
        pending = dict(group)
        try:
            if not group:
                return
            windows = self._start_windows_fetch([span_no for span_no, _ in group])
            ranges = [fetch_range(self.index, span_no) for span_no, _ in group]
            first = ranges[0][0]
            last = max(end for _, end in ranges)
            raw = self.blob.read(first, last - first)
            with self._lock:
                self._counters.bytes_fetched += len(raw)
                self._counters.range_requests += 1
            for (span_no, attempt), (begin, end) in zip(group, ranges, strict=True):
                try:
                    window = self._window(windows, span_no)
                    data = inflate_span(
                        self.index, span_no, raw[begin - first : end - first], window
                    )
                except Exception as exc:
                    self._fail(span_no, attempt, f"{type(exc).__name__}: {exc}", _is_bad_data(exc))
                else:
                    self._succeed(span_no, attempt, data)
                del pending[span_no]
        except Exception as exc:
            bad_data = _is_bad_data(exc)
            for span_no, attempt in sorted(pending.items()):
                self._fail(span_no, attempt, f"{type(exc).__name__}: {exc}", bad_data)

    def _start_windows_fetch(self, span_numbers: list[int]) -> _WindowsFetch | None:
        """Start fetching the windows of consecutive spans (one range of the windows blob) on
        the windows pool; None when the index keeps no external windows or none is needed."""
        if self._windows_pool is None:
            return None
        spans = self.index.spans
        begin = spans[span_numbers[0]].window_offset
        end = max(spans[n].window_offset + spans[n].window_length for n in span_numbers)
        if end <= begin:
            return None
        return _WindowsFetch(begin, self._windows_pool.submit(self._read_windows, begin, end))

    def _read_windows(self, begin: int, end: int) -> bytes:
        assert self.windows is not None  # a windows pool exists only with a windows source
        raw = self.windows.read(begin, end - begin)
        with self._lock:
            self._counters.bytes_fetched += len(raw)
            self._counters.range_requests += 1
        return raw

    def _window(self, fetch: _WindowsFetch | None, span_no: int) -> bytes | None:
        """The span's window from its group's windows fetch (None: inline, or none needed);
        WindowFetchError naming the windows blob if it could not be fetched or decoded."""
        span = self.index.spans[span_no]
        if not span.window_length:
            return None
        windows = self.index.windows
        assert fetch is not None and windows is not None  # a window length implies both
        where = (
            f"windows blob {windows.digest} bytes {span.window_offset}-"
            f"{span.window_offset + span.window_length - 1}"
        )
        try:
            # the windows blob source gives up within the fetch timeout on its own
            raw = fetch.future.result()
            start = span.window_offset - fetch.begin
            return decode_window(raw[start : start + span.window_length])
        except Exception as exc:
            raise WindowFetchError(f"{where}: {type(exc).__name__}: {exc}") from None

    def _succeed(self, span_no: int, attempt: _Attempt, data: bytes) -> None:
        try:
            # inflate_span checked data against this digest
            stored = self.cache.put(self.layer_digest, span_no, data, self._digest(span_no))
        except (OSError, CacheError):
            stored = False  # a full or broken cache disk must not fail the read
        with self._lock:
            self._counters.spans_fetched += 1
            self._counters.spans_cached += int(stored)
            if span_no not in self._verified_spans:
                self._verified_spans.add(span_no)
                self._counters.bytes_verified += self.index.spans[span_no].compressed_size
            self._bad_data.pop(span_no, None)
            current = self._attempts.get(span_no)
            if current is not None and (current is attempt or not current.future.done()):
                # ours, or a newer attempt that replaced ours after its deadline: serve it too
                del self._attempts[span_no]
        for served in {id(a): a for a in (attempt, current) if a is not None}.values():
            with contextlib.suppress(InvalidStateError):  # resolved by a late fetch already
                served.future.set_result(data)

    def _fail(self, span_no: int, attempt: _Attempt, cause: str, bad_data: bool = False) -> None:
        with self._lock:
            self._counters.fetch_errors += 1
            if bad_data:
                self._bad_data[span_no] = self._bad_data.get(span_no, 0) + 1
            attempt.ended = self.clock.monotonic()  # kept in _attempts: it fails fast for a while
        with contextlib.suppress(InvalidStateError):  # served by a late fetch already
            attempt.future.set_exception(SpanReadError(self.layer_digest, span_no, cause))


def _is_bad_data(exc: BaseException) -> bool:
    """The registry answered, and its answer does not fit the index: bytes that do not verify,
    or a range outside the blob (the index claims more than the blob holds). Unlike a refused
    connection or a timeout, another try gets the same answer."""
    if isinstance(exc, SpanVerificationError):
        return True
    if isinstance(exc, BlobFetchError):
        return exc.cause.startswith(("outside the blob", "HTTP 416", "short read"))
    return False
