"""Reads of one layer's files: file range -> uncompressed range -> spans -> cache or fetch.

A read takes each span it touches from the span cache, or claims it (span_states: one state
machine per span) and waits for the one fetch pipeline (span_fetch) to bring it in: one Range
request per group of adjacent missing spans, inflated and verified on a worker thread, stored
in the span cache and only then served. Concurrent readers of one span share one fetch attempt,
so the span is fetched once; readers of other spans never wait for it. One read costs at most
one fetch timeout, and a span whose fetch failed slowly fails fast for a while (span_states).

A read inside the ranges of the layer's start-up pack (pack_store, when the mount has one) is
served from it instead, and spans are not touched.

Beside the reads, two policies claim spans through the same pipeline: read-ahead (read_ahead:
the next spans of a file read front to back) and the startup profile's prefetch (prefetch).
The background fetcher (background) fetches one span at a time on its own thread through
fetch_in_background. A read-ahead fetch that fails quickly is not the read's failure: a read
that joined it fetches the span again on demand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

from snapshotter.fs.activity import NodeActivity
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.prefetch import PREFETCH_IN_FLIGHT, Prefetcher
from snapshotter.fs.read_ahead import READ_AROUND_SCOPES, ReadAheadPolicy, ReadAround
from snapshotter.fs.reader_counters import ReaderCounters, SharedCounters
from snapshotter.fs.span_fetch import FetchPipeline
from snapshotter.fs.span_states import Attempt, Claim, SpanReadError, SpanTable
from snapshotter.fs.span_windows import BlobSource, WindowsFetcher
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range, spans_for_range

__all__ = [
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_READ_AHEAD_SPANS",
    "DEFAULT_READ_AROUND_SCOPE",
    "DEFAULT_WORKERS",
    "READ_AROUND_SCOPES",
    "BlobSource",
    "LayerReader",
    "ReaderCounters",
    "SpanReadError",
]

DEFAULT_WORKERS = 4
DEFAULT_FETCH_TIMEOUT_S = 30.0
DEFAULT_READ_AHEAD_SPANS = 8  # largest read-ahead window, in spans; 0 turns read-ahead off
DEFAULT_READ_AROUND_SCOPE = "directory"


class PackReads(Protocol):
    """The start-up pack's side of a read (pack_store.PackStore): bytes [start, end) of the
    uncompressed tar stream, the parts it lacks through from_spans; None when it holds none."""

    def read(
        self, start: int, end: int, from_spans: Callable[[int, int], bytes]
    ) -> bytes | None: ...

    def fetching(self) -> bool:
        """Still on its way: the background fetch waits for it as for the prefetch."""


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
        read_around_bytes: int = 0,
        read_around_scope: str = DEFAULT_READ_AROUND_SCOPE,
        windows: BlobSource | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`windows` reads the index's windows blob; required when index.windows names one.
        read_around_bytes > 0: a read that misses fetches the spans after its missing ones in
        the same request, up to that many compressed bytes, within the file or its directory
        (read_around_scope; read_ahead.ReadAround)."""
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
        if read_around_bytes < 0:
            raise ValueError(
                f"layer {index.layer_digest}: read_around_bytes must be >= 0, not "
                f"{read_around_bytes}"
            )
        if fetch_timeout <= 0:
            raise ValueError(
                f"layer {index.layer_digest}: fetch_timeout must be > 0, not {fetch_timeout}"
            )
        self.index = index
        self.cache = cache
        self.clock = clock
        self.fetch_timeout = fetch_timeout
        self._counters = SharedCounters()
        self._table = SpanTable(index.layer_digest, fetch_timeout, clock)
        # One windows request per group fetch at most, and each group's fetch waits for its
        # own: a thread per fetching thread (span workers, prefetch fetches, background
        # fetcher) means a windows request never queues behind another group's.
        windows_fetcher = (
            WindowsFetcher(
                index, windows, self._counters, workers + PREFETCH_IN_FLIGHT + 1, cache, clock
            )
            if windows is not None
            else None
        )
        self._pipeline = FetchPipeline(
            index,
            blob,
            cache,
            self._table,
            self._counters,
            workers=workers,
            windows=windows_fetcher,
        )
        self._node_activity = NodeActivity(cache.directory, clock)  # every layer sharing the cache
        self._prefetcher = Prefetcher(self._pipeline, self._counters, self._node_activity)
        self._read_ahead = ReadAheadPolicy(index, read_ahead_spans) if read_ahead_spans else None
        self._read_around = (
            ReadAround(index, read_around_bytes, read_around_scope) if read_around_bytes else None
        )
        # When a read last had to go to the network: the background fetcher waits for it, and
        # for the prefetch, to go quiet.
        self._last_demand_miss = clock.monotonic()
        self._degraded: set[int] = set()
        self.pack: PackReads | None = None  # set by the mount process before it goes live

    @property
    def layer_digest(self) -> str:
        return self.index.layer_digest

    def counters(self) -> ReaderCounters:
        return self._counters.snapshot()

    @property
    def shared_counters(self) -> SharedCounters:
        """The counters the pack store adds to (pack bytes, reads served from the pack)."""
        return self._counters

    def close(self) -> None:
        self._prefetcher.close()
        self._pipeline.close()

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes:
        """Up to size bytes of entry's data from offset (fewer at end of file)."""
        if offset < 0 or size < 0:
            raise ValueError(f"{entry.name}: negative offset {offset} or size {size}")
        start = entry.offset + min(offset, entry.size)
        end = entry.offset + min(offset + size, entry.size)
        if start >= end:
            return b""
        if self.pack is not None:
            packed = self.pack.read(
                start, end, lambda lo, hi: self.read(entry, lo - entry.offset, hi - lo)
            )  # the parts the pack lacks: read again, they miss the pack and go to spans
            if packed is not None:
                return packed
        span_numbers = spans_for_range(self.index, start, end)
        pieces: dict[int, bytes] = {}
        waiting: dict[int, tuple[Claim, int, int]] = {}
        missing: dict[int, Attempt] = {}
        for span_no in span_numbers:
            span = self.index.spans[span_no]
            lo = max(start, span.uncompressed_start) - span.uncompressed_start
            hi = min(end, span.uncompressed_end) - span.uncompressed_start
            found = self._cached_or_claimed(span_no, lo, hi)
            if isinstance(found, bytes):
                pieces[span_no] = found
                continue
            waiting[span_no] = (found, lo, hi)
            if found.is_new:
                missing[span_no] = found.attempt
        if missing:
            self._note_demand_miss()
            if self._read_around is not None and span_numbers[-1] in missing:
                self._claim_around(entry, min(missing), span_numbers[-1], missing)
            self._pipeline.submit(missing)
        if self._read_ahead is not None:
            # after the read's own fetches: the workers take those first
            self._fetch_ahead(entry, span_numbers[0], span_numbers[-1])
        for span_no, (claim, lo, hi) in waiting.items():
            pieces[span_no] = self._wait_or_refetch(span_no, claim)[lo:hi]
        return b"".join(pieces[span_no] for span_no in span_numbers)

    def prefetch(self, span_numbers: Iterable[int]) -> None:
        """Fetch spans in the background, in order; returns at once (prefetch.Prefetcher)."""
        self._prefetcher.start(span_numbers)

    def idle_seconds(self) -> float:
        """Seconds since a read of this layer last missed, or any layer sharing its cache last
        missed or prefetched; -inf while this layer's prefetch list or pack is still coming."""
        if self._prefetcher.running() or (self.pack is not None and self.pack.fetching()):
            return -math.inf
        with self._counters.lock:
            own = self.clock.monotonic() - self._last_demand_miss
        return min(own, self._node_activity.seconds_since_foreground_fetch())

    def bad_data_failures(self, span_no: int) -> int:
        """How often the span's bytes did not fit the index (bytes that do not verify, or a
        range outside the blob): trying again gets the same answer."""
        return self._table.bad_data_failures(span_no)

    def mark_degraded(self, span_no: int) -> None:
        """Background fetch gave up on the span: counted for status and metrics (reads still
        try it, and get EIO while its bytes do not verify)."""
        with self._counters.lock:
            if span_no not in self._degraded:
                self._degraded.add(span_no)
                self._counters.values.degraded_spans += 1

    def is_cached(self, span_no: int) -> bool:
        return self._pipeline.is_cached(span_no)

    def fetch_in_background(self, span_no: int) -> int:
        """Fetch one span on the caller's thread unless it is cached or in flight already;
        the compressed bytes fetched (0 if nothing was needed). Errors are counted, not raised:
        the span stays missing and a later read fetches it on demand."""
        claim = self._pipeline.claim(span_no)
        if claim is None or not claim.is_new:
            return 0
        window_bytes = self._pipeline.fetch_group([(span_no, claim.attempt)])
        if claim.attempt.data is None:
            return 0
        begin, end = fetch_range(self.index, span_no)
        fetched = end - begin + window_bytes  # a window not held came from the windows blob
        with self._counters.lock:
            self._counters.values.background_spans += 1
            self._counters.values.background_bytes += fetched
        return fetched

    # -- internals -----------------------------------------------------------------------------

    def _cached_or_claimed(self, span_no: int, lo: int, hi: int) -> bytes | Claim:
        """Bytes [lo, hi) of the span from the cache, or the claim to wait on."""
        cached = self._from_cache(span_no, lo, hi)
        if cached is not None:
            return cached
        claim = self._pipeline.claim(span_no)
        if claim is None:  # stored by someone else between the two looks
            cached = self._from_cache(span_no, lo, hi)
            if cached is not None:
                return cached
            claim = self._pipeline.claim(span_no, force=True)
            assert claim is not None
        return claim

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
            with self._counters.lock:
                self._counters.values.cache_hits += 1
        return data

    def _note_demand_miss(self) -> None:
        with self._counters.lock:
            self._counters.values.demand_misses += 1
            self._last_demand_miss = self.clock.monotonic()
        self._node_activity.note_foreground_fetch()

    def _wait_or_refetch(self, span_no: int, claim: Claim) -> bytes:
        """The whole span: from the claimed attempt, or, if it was a read-ahead that failed
        quickly, from one fetch on demand (the read-ahead's failure is not this read's)."""
        attempt = claim.attempt
        try:
            return self._table.wait(span_no, attempt, claim.wait_until)
        except SpanReadError:
            if not (attempt.read_ahead and attempt.failed_quickly()):
                raise
        found = self._cached_or_claimed(span_no, 0, self.index.spans[span_no].uncompressed_size)
        if isinstance(found, bytes):
            return found
        if found.is_new:
            self._note_demand_miss()
            self._pipeline.submit({span_no: found.attempt})
        return self._table.wait(span_no, found.attempt, found.wait_until)

    def _claim_around(
        self, entry: TocEntry, first: int, last: int, missing: dict[int, Attempt]
    ) -> None:
        """Claim the read-around spans after the read's missing [first, last] into missing
        (one request with them), up to the first one cached or in flight."""
        assert self._read_around is not None
        for span_no in self._read_around.candidates(entry, first, last):
            claim = self._pipeline.claim(span_no, read_ahead=True)
            if claim is None or not claim.is_new:
                break
            missing[span_no] = claim.attempt

    def _fetch_ahead(self, entry: TocEntry, first: int, last: int) -> None:
        """Claim and fetch what the read-ahead policy says follows a read of entry's spans
        [first, last]."""
        assert self._read_ahead is not None
        claimed: dict[int, Attempt] = {}
        for span_no in self._read_ahead.window(entry, first, last):
            claim = self._pipeline.claim(span_no, read_ahead=True)
            if claim is not None and claim.is_new:
                claimed[span_no] = claim.attempt
        if not claimed:
            return
        # The background fetcher waits for read-ahead as it waits for the misses it replaces.
        with self._counters.lock:
            self._counters.values.readahead_spans += len(claimed)
            self._last_demand_miss = self.clock.monotonic()
        self._node_activity.note_foreground_fetch()
        self._pipeline.submit(claimed)
