"""Windows of a version 2 gzip index: taken from the span before, or fetched beside the spans.

A gzip span's window is the 32 KiB of uncompressed bytes before it (docs/index-format.md), so
a reader that holds those bytes needs nothing from the windows blob: when the span before is
in the span cache, or was inflated just before in the same fetch group, the window is its
tail (across several spans when they are shorter than 32 KiB). Only the others come from the
windows blob (snapshotter.index.codec): for a group of consecutive spans that is at most the
first span's window, fetched as one more Range request on a small pool of its own at the same
time as the group's data, so it adds no round trip.

A window taken from held bytes can never yield a wrong byte: the span's uncompressed digest
still verifies the result. If it fails, the span is inflated again with its window from the
windows blob, so a damaged cached predecessor costs a request, not the read. A window that
cannot be fetched or decoded fails its span (WindowFetchError naming the windows blob).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from snapshotter.fs.cache import SpanCache
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.reader_counters import SharedCounters
from snapshotter.fs.span_states import Attempt
from snapshotter.index.codec import decode_window
from snapshotter.index.errors import SpanVerificationError
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import inflate_span

WINDOW_SIZE = 32 << 10  # deflate's history: the most a window holds
# How long a group waits for a claimed predecessor that is not being fetched yet (queued behind
# busy workers, or about to be submitted) beyond what its own data request took; then its
# window comes from the windows blob, a round trip later.
QUEUED_PREDECESSOR_WAIT_S = 0.02


class BlobSource(Protocol):
    """A compressed blob (the layer, or its windows blob). One call is one Range read; it
    raises on failure (for the registry reader: snapshotter.remote.errors.BlobFetchError) and
    must give up on its own within the fetch timeout it was built with."""

    def read(self, offset: int, length: int) -> bytes: ...


class WindowFetchError(Exception):
    """A span's window could not be fetched from the windows blob or is not a valid frame."""


@dataclass
class WindowsFetch:
    """The windows of one fetch group: the uncompressed bytes held before the next span, and
    the windows blob bytes from `begin` for the spans in `fetched`, once fetched."""

    tail: bytes  # up to WINDOW_SIZE uncompressed bytes ending at tail_end
    tail_end: int  # -1: nothing held
    # the span before the group, in flight in another group: its data will be the window
    predecessor: Attempt | None = None
    # when this group started, if the predecessor's group was not running then: the wait for
    # it is bounded by this group's own fetch time; None: until its deadline
    started: float | None = None
    begin: int = 0
    future: Future[bytes] | None = None
    fetched: frozenset[int] = frozenset()
    window_bytes: int = 0  # windows blob bytes this group asked for


class WindowsFetcher:
    def __init__(
        self,
        index: LayerIndex,
        source: BlobSource,
        counters: SharedCounters,
        threads: int,
        cache: SpanCache | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """threads: one per thread that fetches groups, so a group's windows request never
        queues behind another group's. cache: where the spans before a group are looked for."""
        self.index = index
        self.source = source
        self.cache = cache
        self.clock = clock
        self._counters = counters
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="window-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start(
        self, span_numbers: list[int], predecessor: Attempt | None = None, *, running: bool = True
    ) -> WindowsFetch:
        """Before fetching a group of consecutive spans: the first one's window from the span
        before it when that one is in flight in another group (predecessor: its attempt;
        inflate waits for it, until its deadline when its group is running, else as long as
        this group's data took plus QUEUED_PREDECESSOR_WAIT_S), or is cached; else start
        fetching it from the windows blob. Later spans' windows come from the spans before."""
        first = span_numbers[0]
        span = self.index.spans[first]
        if not span.window_length:
            return WindowsFetch(b"", -1)
        if predecessor is not None and self._one_span_back(first):
            # a queued group never waits long for another (no deadlock on busy workers)
            started = None if running else self.clock.monotonic()
            return WindowsFetch(b"", -1, predecessor=predecessor, started=started)
        held = self._cached_window(first)
        fetch = WindowsFetch(held or b"", span.uncompressed_start if held is not None else -1)
        if held is None:
            self._start_fetch(fetch, [first])
        return fetch

    def inflate(self, fetch: WindowsFetch, span_no: int, compressed: bytes) -> bytes:
        """inflate_span with the span's window: from the bytes held before it when it has them
        (checked by the span's digest; on a mismatch once more with the fetched window), else
        from the windows blob. Spans must come in order; a failed one breaks the chain."""
        span = self.index.spans[span_no]
        if fetch.predecessor is not None:
            self._take_predecessor(fetch, span_no)
        derived = self._held_window(fetch, span_no)
        try:
            if derived is not None:
                try:
                    data = inflate_span(self.index, span_no, compressed, derived)
                except SpanVerificationError as first:
                    # a damaged cached span before it, or bad data: the span's own window
                    # decides (bad data still fails, as itself)
                    try:
                        window = self._fetched_window(fetch, span_no)
                    except WindowFetchError:
                        raise first from None
                    data = inflate_span(self.index, span_no, compressed, window)
            else:
                data = inflate_span(
                    self.index, span_no, compressed, self._fetched_window(fetch, span_no)
                )
        except Exception:
            fetch.tail, fetch.tail_end = b"", -1
            raise
        if fetch.tail_end == span.uncompressed_start:
            fetch.tail = (fetch.tail + data)[-WINDOW_SIZE:]
        else:
            fetch.tail = data[-WINDOW_SIZE:]
        fetch.tail_end = span.uncompressed_end
        return data

    # -- internals -----------------------------------------------------------------------------

    def _one_span_back(self, span_no: int) -> bool:
        """The span before holds the whole window (it is not shorter than the window)."""
        spans = self.index.spans
        return span_no > 0 and spans[span_no - 1].uncompressed_size >= min(
            WINDOW_SIZE, spans[span_no].uncompressed_start
        )

    def _take_predecessor(self, fetch: WindowsFetch, span_no: int) -> None:
        """Wait for the span before (in flight in another group, which never waits for this
        one: a group waits only for a lower span) and hold its tail; if it fails or is late,
        the window comes from the windows blob."""
        attempt, fetch.predecessor = fetch.predecessor, None
        assert attempt is not None
        now = self.clock.monotonic()
        until = attempt.deadline
        if fetch.started is not None:
            until = min(until, now + (now - fetch.started) + QUEUED_PREDECESSOR_WAIT_S)
        self.clock.wait(attempt.done, until - now)
        data = attempt.data
        if data is not None:
            fetch.tail = data[-WINDOW_SIZE:]
            fetch.tail_end = self.index.spans[span_no].uncompressed_start

    def _held_window(self, fetch: WindowsFetch, span_no: int) -> bytes | None:
        """The span's window from the bytes held before it; None when it has no window (the
        empty inline one is used) or they are not held."""
        span = self.index.spans[span_no]
        if not span.window_length or fetch.tail_end != span.uncompressed_start:
            return None
        if len(fetch.tail) < min(WINDOW_SIZE, span.uncompressed_start):
            return None  # a short span after a gap: not the whole history
        return fetch.tail

    def _cached_window(self, span_no: int) -> bytes | None:
        """The WINDOW_SIZE uncompressed bytes before the span, from the cached spans before it
        (several when they are short); None unless the span needs a window and all are held."""
        spans = self.index.spans
        if self.cache is None or not spans[span_no].window_length:
            return None
        start = spans[span_no].uncompressed_start
        want = max(0, start - WINDOW_SIZE)
        parts: list[bytes] = []
        n = span_no - 1
        while n >= 0 and spans[n].uncompressed_end > want:
            span = spans[n]
            lo = max(want, span.uncompressed_start) - span.uncompressed_start
            try:
                part = self.cache.read(
                    self.index.layer_digest,
                    n,
                    lo,
                    span.uncompressed_size - lo,
                    span.uncompressed_size,
                    span.uncompressed_digest,
                )
            except (OSError, CacheError):
                part = None  # a broken cache disk: fetch the window instead
            if part is None:
                return None
            parts.append(part)
            n -= 1
        return b"".join(reversed(parts))

    def _start_fetch(self, fetch: WindowsFetch, span_numbers: list[int]) -> None:
        spans = self.index.spans
        begin = spans[span_numbers[0]].window_offset
        end = max(spans[n].window_offset + spans[n].window_length for n in span_numbers)
        fetch.begin = begin
        fetch.future = self._pool.submit(self._read, begin, end)
        fetch.fetched = frozenset(span_numbers)
        fetch.window_bytes += end - begin

    def _fetched_window(self, fetch: WindowsFetch, span_no: int) -> bytes | None:
        """The span's window from the windows blob (None: it needs none): from the group's
        fetch started with the data, or fetched now (its predecessor failed, or did not
        verify); WindowFetchError naming the windows blob if it cannot be had."""
        span = self.index.spans[span_no]
        if not span.window_length:
            return None
        windows = self.index.windows
        assert windows is not None  # a window length implies a windows blob
        where = (
            f"windows blob {windows.digest} bytes {span.window_offset}-"
            f"{span.window_offset + span.window_length - 1}"
        )
        try:
            if span_no not in fetch.fetched:
                self._start_fetch(fetch, [span_no])
            assert fetch.future is not None
            # the windows blob source gives up within the fetch timeout on its own
            raw = fetch.future.result()
            start = span.window_offset - fetch.begin
            return decode_window(raw[start : start + span.window_length])
        except Exception as exc:
            raise WindowFetchError(f"{where}: {type(exc).__name__}: {exc}") from None

    def _read(self, begin: int, end: int) -> bytes:
        raw = self.source.read(begin, end - begin)
        with self._counters.lock:
            self._counters.values.bytes_fetched += len(raw)
            self._counters.values.range_requests += 1
        return raw
