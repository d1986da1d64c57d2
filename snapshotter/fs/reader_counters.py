"""What one layer's reader has done, for status and metrics; shared by its fetch pipeline and
the policies that drive it, under one lock."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass


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
    pack_bytes: int = 0  # compressed bytes of the start-up pack received (pack_store.py)
    pack_reads: int = 0  # reads served from the start-up pack

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class SharedCounters:
    """ReaderCounters updated from many threads: change `values` only under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = ReaderCounters()

    def snapshot(self) -> ReaderCounters:
        with self.lock:
            return ReaderCounters(**self.values.as_dict())
