"""The one way a span of a layer gets from the registry into the span cache, whoever wants it
(a read, read-ahead, the startup-profile prefetch, the background fetcher):

    claim (span_states: absent -> in flight) -> one Range request per group of adjacent spans
    -> inflate, which checks the compressed digest before and the uncompressed one after
    (snapshotter.index.spans) -> store in the span cache -> resolve the attempt (cached, or
    failed: span_states decides for how long it fails fast).

Fetches run on the pipeline's workers, or on the caller's thread (fetch_group), so a reader of
one span never waits for another span's fetch. Every claimed attempt is resolved whatever
happens, so nobody waits past its deadline for nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from snapshotter.fs.cache import SpanCache
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.reader_counters import SharedCounters
from snapshotter.fs.span_states import Attempt, Claim, SpanTable
from snapshotter.fs.span_windows import BlobSource, WindowsFetcher
from snapshotter.index.errors import SpanVerificationError
from snapshotter.index.model import LayerIndex, Span
from snapshotter.index.spans import fetch_range, inflate_span
from snapshotter.remote.errors import BlobFetchError

# Cap on one coalesced Range request, so one huge read does not hold a worker for long.
MAX_COALESCED_BYTES = 32 << 20

ClaimedGroup = list[tuple[int, Attempt]]


class FetchPipeline:
    def __init__(
        self,
        index: LayerIndex,
        blob: BlobSource,
        cache: SpanCache,
        table: SpanTable,
        counters: SharedCounters,
        *,
        workers: int,
        windows: WindowsFetcher | None,
    ) -> None:
        self.index = index
        self.blob = blob
        self.cache = cache
        self.table = table
        self.windows = windows
        self._counters = counters
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="span-fetch")
        self._verified_spans: set[int] = set()  # for bytes_verified
        # Spans whose group is being fetched on some thread now: a group right after one of
        # them takes its first window from it (span_windows) rather than the windows blob.
        self._running: dict[int, Attempt] = {}
        self._running_lock = threading.Lock()
        # Spans submitted to the workers whose group no worker has taken up yet: the first
        # worker to take up a group takes its queued neighbours along into its one request
        # (the kernel sends a file's reads several at once, each its own group).
        self._queued: dict[int, Attempt] = {}
        self._queued_lock = threading.Lock()

    @property
    def layer_digest(self) -> str:
        return self.index.layer_digest

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.windows is not None:
            self.windows.close()

    def is_cached(self, span_no: int) -> bool:
        digest = self.index.spans[span_no].uncompressed_digest
        return self.cache.contains(self.layer_digest, span_no, digest)

    def claim(self, span_no: int, *, read_ahead: bool = False, force: bool = False) -> Claim | None:
        """span_states.SpanTable.claim, asking the cache whether an absent span is stored
        already (unless force: the caller just found it missing there)."""
        return self.table.claim(
            span_no, None if force else lambda: self.is_cached(span_no), read_ahead=read_ahead
        )

    def submit(self, claimed: dict[int, Attempt]) -> None:
        """Fetch claimed spans on the workers, one request per group of adjacent ones; groups
        of the same kind still queued when a worker takes up one next to them go along in its
        request."""
        groups = self.groups(claimed)
        with self._queued_lock:
            # an attempt still queued when its span is claimed anew ran out of time waiting
            stale = [(n, self._queued[n]) for n in claimed if n in self._queued]
            self._queued.update(claimed)
        for span_no, attempt in stale:
            if attempt is not claimed[span_no]:
                self.fail(span_no, attempt, f"not started within {self.table.fetch_timeout:g}s")
        for group in groups:
            self._pool.submit(self._fetch_queued, [span_no for span_no, _ in group])

    def _fetch_queued(self, span_numbers: list[int]) -> None:
        """On a worker: fetch what of the group is still queued, with the queued spans of
        the same kind (read, or read-ahead) adjacent to it, in as few requests as
        MAX_COALESCED_BYTES allows."""
        with self._queued_lock:
            taken = {n: self._queued.pop(n) for n in span_numbers if n in self._queued}
            if not taken:
                return  # a worker took this group along with its neighbour's
            spans = self.index.spans
            low, high = min(taken), max(taken)
            # a read waits for its whole request: read-ahead is not taken along with it
            read_ahead = taken[low].read_ahead

            def joins(span_no: int) -> bool:
                queued = self._queued.get(span_no)
                return queued is not None and queued.read_ahead == read_ahead

            while joins(low - 1) and _fits(spans, low - 1, high):
                low -= 1
                taken[low] = self._queued.pop(low)
            while joins(high + 1) and _fits(spans, low, high + 1):
                high += 1
                taken[high] = self._queued.pop(high)
        for group in self.groups(taken):
            self.fetch_group(group)

    def groups(self, claimed: dict[int, Attempt]) -> list[ClaimedGroup]:
        """Claimed spans in order, adjacent ones together, up to MAX_COALESCED_BYTES a group."""
        spans = self.index.spans
        groups: list[ClaimedGroup] = []
        for span_no in sorted(claimed):
            if groups:
                last = groups[-1]
                if span_no == last[-1][0] + 1 and _fits(spans, last[0][0], span_no):
                    last.append((span_no, claimed[span_no]))
                    continue
            groups.append([(span_no, claimed[span_no])])
        return groups

    def fetch_group(self, group: ClaimedGroup) -> int:
        """One Range request for the group, then inflate + verify + cache each span, on the
        caller's thread. Every attempt of the group is resolved whatever happens. Returns the
        windows blob bytes the group asked for (span_windows: most windows are held already)."""
        now = self.table.clock.monotonic()
        group = [(n, a) for n, a in group if not a.done.is_set()]  # served by a late fetch
        for span_no, attempt in group:
            if now >= attempt.deadline:
                # queued behind busy workers until its readers gave up: it ends here, and a
                # later read starts a fresh attempt, rather than piling requests onto a slow
                # registry
                self.fail(span_no, attempt, f"not started within {self.table.fetch_timeout:g}s")
        group = [(n, a) for n, a in group if now < a.deadline]
        pending = dict(group)
        windows = None
        predecessor: Attempt | None = None
        running = False
        if self.windows is not None and group:
            with self._running_lock:
                self._running.update(group)
                predecessor = self._running.get(group[0][0] - 1)
            running = predecessor is not None
            if predecessor is None:  # claimed, maybe queued behind this group: wait briefly
                predecessor = self.table.in_flight(group[0][0] - 1)
        try:
            if not group:
                return 0
            if self.windows is not None:
                windows = self.windows.start([n for n, _ in group], predecessor, running=running)
            ranges = [fetch_range(self.index, span_no) for span_no, _ in group]
            first = ranges[0][0]
            last = max(end for _, end in ranges)
            raw = self.blob.read(first, last - first)
            with self._counters.lock:
                self._counters.values.bytes_fetched += len(raw)
                self._counters.values.range_requests += 1
            for (span_no, attempt), (begin, end) in zip(group, ranges, strict=True):
                try:
                    piece = raw[begin - first : end - first]
                    if self.windows is not None and windows is not None:
                        data = self.windows.inflate(windows, span_no, piece)
                    else:
                        data = inflate_span(self.index, span_no, piece)
                except Exception as exc:
                    self.fail(span_no, attempt, _describe(exc), bad_data=_is_bad_data(exc))
                else:
                    self._succeed(span_no, attempt, data)
                del pending[span_no]
        except Exception as exc:
            bad_data = _is_bad_data(exc)
            for span_no, attempt in sorted(pending.items()):
                self.fail(span_no, attempt, _describe(exc), bad_data=bad_data)
        finally:
            if self.windows is not None and group:
                with self._running_lock:
                    for span_no, attempt in group:
                        if self._running.get(span_no) is attempt:
                            del self._running[span_no]
        return windows.window_bytes if windows is not None else 0

    def fail(self, span_no: int, attempt: Attempt, cause: str, *, bad_data: bool = False) -> None:
        with self._counters.lock:
            self._counters.values.fetch_errors += 1
        self.table.fail(span_no, attempt, cause, bad_data=bad_data)

    def _succeed(self, span_no: int, attempt: Attempt, data: bytes) -> None:
        span = self.index.spans[span_no]
        try:
            # inflate_span checked data against this digest
            stored = self.cache.put(self.layer_digest, span_no, data, span.uncompressed_digest)
        except (OSError, CacheError):
            stored = False  # a full or broken cache disk must not fail the read
        with self._counters.lock:
            counters = self._counters.values
            counters.spans_fetched += 1
            counters.spans_cached += int(stored)
            if span_no not in self._verified_spans:
                self._verified_spans.add(span_no)
                counters.bytes_verified += span.compressed_size
        self.table.succeed(span_no, attempt, data)


def _fits(spans: Sequence[Span], first: int, last: int) -> bool:
    """Spans first..last fit one coalesced request."""
    return spans[last].compressed_end - spans[first].compressed_start <= MAX_COALESCED_BYTES


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_bad_data(exc: BaseException) -> bool:
    """The registry answered, and its answer does not fit the index: bytes that do not verify,
    or a range outside the blob (the index claims more than the blob holds). Unlike a refused
    connection or a timeout, another try gets the same answer."""
    if isinstance(exc, SpanVerificationError):
        return True
    if isinstance(exc, BlobFetchError):
        return exc.cause.startswith(("outside the blob", "HTTP 416", "short read"))
    return False
