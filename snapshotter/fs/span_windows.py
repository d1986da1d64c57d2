"""Windows of a version 2 gzip index, fetched beside the spans they serve.

Such an index keeps the spans' 32 KiB windows in a windows blob (snapshotter.index.codec). The
windows of a group of consecutive spans are one contiguous range there, fetched as one more
Range request on a small pool of its own, at the same time as the group's data, so it adds no
round trip. A window that cannot be fetched or decoded fails its span (WindowFetchError naming
the windows blob); a wrong one fails the span's digest check.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from snapshotter.fs.reader_counters import SharedCounters
from snapshotter.index.codec import decode_window
from snapshotter.index.model import LayerIndex


class BlobSource(Protocol):
    """A compressed blob (the layer, or its windows blob). One call is one Range read; it
    raises on failure (for the registry reader: snapshotter.remote.errors.BlobFetchError) and
    must give up on its own within the fetch timeout it was built with."""

    def read(self, offset: int, length: int) -> bytes: ...


class WindowFetchError(Exception):
    """A span's window could not be fetched from the windows blob or is not a valid frame."""


@dataclass(frozen=True)
class WindowsFetch:
    """The windows of one fetch group: windows blob bytes from `begin`, once fetched."""

    begin: int
    future: Future[bytes]


class WindowsFetcher:
    def __init__(
        self, index: LayerIndex, source: BlobSource, counters: SharedCounters, threads: int
    ) -> None:
        """threads: one per thread that fetches groups, so a group's windows request never
        queues behind another group's."""
        self.index = index
        self.source = source
        self._counters = counters
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="window-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start(self, span_numbers: list[int]) -> WindowsFetch | None:
        """Start fetching the windows of consecutive spans (one range of the windows blob);
        None when none of them needs one."""
        spans = self.index.spans
        begin = spans[span_numbers[0]].window_offset
        end = max(spans[n].window_offset + spans[n].window_length for n in span_numbers)
        if end <= begin:
            return None
        return WindowsFetch(begin, self._pool.submit(self._read, begin, end))

    def window(self, fetch: WindowsFetch | None, span_no: int) -> bytes | None:
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

    def _read(self, begin: int, end: int) -> bytes:
        raw = self.source.read(begin, end - begin)
        with self._counters.lock:
            self._counters.values.bytes_fetched += len(raw)
            self._counters.values.range_requests += 1
        return raw
