"""Read-ahead in LayerReader: a file read forward span by span has its next spans fetched before
the reads reach them, in few large Range requests; any other pattern fetches only what it reads.
Against the tests' real HTTP server answering Range requests (no FUSE)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs import read_ahead as read_ahead_module
from snapshotter.fs import reader as reader_module
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.reader import LayerReader
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import spans_for_range
from tests.fs.fs_helpers import (
    SPAN_SIZE,
    BlobServer,
    Member,
    _data,
    built_index,
    compress,
    make_tar,
)
from tests.fs.manual_clock import ManualClock

TIMEOUT = 5.0
BIG_SPANS = 30  # at least; the index cuts spans of ~2 SPAN_SIZE of this data


@dataclass
class Layer:
    tar: bytes
    index: LayerIndex
    server: BlobServer

    def entry(self, name: str) -> TocEntry:
        return next(e for e in self.index.entries if e.name == name)

    def data(self, entry: TocEntry) -> bytes:
        return self.tar[entry.offset : entry.offset + entry.size]

    def spans_of(self, entry: TocEntry) -> range:
        return spans_for_range(self.index, entry.offset, entry.offset + entry.size)

    def span_bytes(self, span_numbers: set[int]) -> int:
        """Compressed bytes of the spans, fetched one by one (neighbouring gzip spans share a
        byte, so requests of several spans fetch a little less)."""
        return sum(self.index.spans[n].compressed_size for n in span_numbers)


@pytest.fixture
def layer() -> Iterator[Layer]:
    tar = make_tar(
        [
            Member("before", data=_data("before", 3 * SPAN_SIZE)),
            Member("big", data=_data("big", 2 * BIG_SPANS * SPAN_SIZE + 777)),
            Member("other", data=_data("other", 24 * SPAN_SIZE)),
            Member("after", data=_data("after", 6 * SPAN_SIZE)),
        ]
    )
    blob = compress(tar, "gzip")
    server = BlobServer(blob)
    yield Layer(tar, built_index(blob, "gzip"), server)
    server.stop()


@pytest.fixture
def readers(layer: Layer, tmp_path: Path) -> Iterator[list[LayerReader]]:
    made: list[LayerReader] = []
    yield made
    for reader in made:
        reader.close()


def _reader(
    layer: Layer,
    cache_dir: Path,
    made: list[LayerReader],
    read_ahead_spans: int = reader_module.DEFAULT_READ_AHEAD_SPANS,
    blob: UrlBlobSource | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> LayerReader:
    source = blob or UrlBlobSource(
        layer.server.url, timeout=TIMEOUT, digest=layer.index.layer_digest
    )
    reader = LayerReader(
        layer.index,
        source,
        SpanCache(cache_dir, 1 << 30, clock=clock),
        fetch_timeout=TIMEOUT,
        read_ahead_spans=read_ahead_spans,
        clock=clock,
    )
    made.append(reader)
    return reader


def _read_forward(reader: LayerReader, entry: TocEntry, chunk: int) -> bytes:
    return b"".join(reader.read(entry, offset, chunk) for offset in range(0, entry.size, chunk))


def _settle(reader: LayerReader, seconds: float = 10.0) -> None:
    """Wait until the fetches have ended (read-ahead ends after the read that started it):
    on loopback a fetch takes milliseconds, so counters unchanged for 0.6 s mean none runs."""
    deadline = time.monotonic() + seconds
    last, stable = reader.counters(), 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = reader.counters()
        stable = stable + 1 if now == last else 0
        if stable >= 3:
            return
        last = now
    raise AssertionError(f"fetches still running after {seconds} s: {reader.counters()}")


def _fetched_spans(layer: Layer) -> set[int]:
    """Span numbers every Range request the server answered covered."""
    fetched: set[int] = set()
    for first, last in layer.server.requests:
        fetched.update(
            n
            for n, span in enumerate(layer.index.spans)
            if first <= span.compressed_start and span.compressed_end <= last + 1
        )
    return fetched


def test_a_sequential_read_fetches_ahead_in_few_large_requests(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big = layer.entry("big")
    spans = layer.spans_of(big)
    assert len(spans) >= BIG_SPANS

    without = _reader(layer, tmp_path / "off", readers, read_ahead_spans=0)
    assert _read_forward(without, big, 16 << 10) == layer.data(big)
    requests_without = layer.server.request_count()
    assert requests_without == len(spans)  # one request per span the reads reach

    layer.server.requests.clear()
    with_ahead = _reader(layer, tmp_path / "on", readers)
    assert _read_forward(with_ahead, big, 16 << 10) == layer.data(big)
    _settle(with_ahead)
    counters = with_ahead.counters()
    assert counters.readahead_spans >= len(spans) - 4
    assert counters.demand_misses <= 3  # the first spans, before the pattern showed
    assert layer.server.request_count() <= len(spans) // 3
    # Nothing beyond the file, nothing twice.
    assert _fetched_spans(layer) == set(spans)
    assert counters.spans_fetched == len(spans)
    assert counters.bytes_fetched <= layer.span_bytes(set(spans))
    assert without.counters().bytes_fetched >= counters.bytes_fetched


def test_spans_ahead_are_cached_before_a_read_reaches_them(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big = layer.entry("big")
    first = layer.spans_of(big)[0]
    reader = _reader(layer, tmp_path, readers)
    start = layer.index.spans[first].uncompressed_end - big.offset  # span first + 1
    reader.read(big, 0, 100)
    reader.read(big, start, 100)  # the span right after the previous miss: sequential
    _settle(reader)
    assert reader.is_cached(first + 2) and reader.is_cached(first + 3)
    assert not reader.is_cached(first + 4)
    requests = layer.server.request_count()
    assert requests == 3  # span first, span first + 1, and one request for the two ahead
    entry_offset = layer.index.spans[first + 3].uncompressed_start - big.offset
    assert reader.read(big, entry_offset, 100) == layer.data(big)[entry_offset:][:100]
    assert reader.counters().demand_misses == 2


def test_the_window_grows_and_each_request_stays_under_the_byte_cap(
    layer: Layer, tmp_path: Path, readers: list[LayerReader], monkeypatch: pytest.MonkeyPatch
) -> None:
    big = layer.entry("big")
    spans = layer.spans_of(big)
    largest = max(layer.index.spans[n].compressed_size for n in spans)
    cap = 5 * largest
    monkeypatch.setattr(read_ahead_module, "READ_AHEAD_MAX_BYTES", cap)
    reader = _reader(layer, tmp_path, readers, read_ahead_spans=16)
    assert _read_forward(reader, big, SPAN_SIZE) == layer.data(big)
    _settle(reader)
    sizes = [last + 1 - first for first, last in layer.server.requests]
    assert max(sizes) <= cap
    assert max(sizes) >= 4 * min(layer.index.spans[n].compressed_size for n in spans)
    assert _fetched_spans(layer) == set(spans)


def test_a_random_pattern_fetches_only_the_spans_it_reads(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big, other = layer.entry("big"), layer.entry("other")
    spans = list(layer.spans_of(big))
    # Random reads: each lands at least 10 spans away from the previous one.
    rng = random.Random(7)
    order = [rng.choice(spans)]
    while len(order) < len(spans) // 2:
        order.append(rng.choice([n for n in spans if abs(n - order[-1]) >= 10]))
    reader = _reader(layer, tmp_path, readers)
    for span_no in order:
        span = layer.index.spans[span_no]
        offset = max(span.uncompressed_start, big.offset) - big.offset + 10
        assert reader.read(big, offset, 4096) == layer.data(big)[offset : offset + 4096]
    # Another file read backwards, each piece twice: no forward pattern either.
    for offset in reversed(range(0, other.size, 48 << 10)):
        want = layer.data(other)[offset : offset + 100]
        assert reader.read(other, offset, 100) == want
        assert reader.read(other, offset, 100) == want
    _settle(reader)
    read = set(order) | set(layer.spans_of(other))
    counters = reader.counters()
    assert counters.readahead_spans == 0
    assert _fetched_spans(layer) == read
    assert counters.spans_fetched == len(read)
    assert counters.bytes_fetched <= layer.span_bytes(read)


class FailingOnce(UrlBlobSource):
    """The real HTTP blob source, except that the first request starting at one of `offsets`
    fails (after `hold` is set, if given): a registry that drops one request."""

    def __init__(self, url: str, digest: str, offsets: set[int]) -> None:
        super().__init__(url, timeout=TIMEOUT, digest=digest)
        self.offsets = set(offsets)
        self.hold: threading.Event | None = None
        self.failed: list[int] = []

    def read(self, offset: int, length: int) -> bytes:
        if offset in self.offsets:
            self.offsets.discard(offset)
            if self.hold is not None:
                self.hold.wait(TIMEOUT)
            self.failed.append(offset)
            raise ConnectionResetError(f"test: request at {offset} dropped")
        return super().read(offset, length)


def test_a_failed_read_ahead_fails_no_read_and_its_spans_are_fetched_on_demand(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big = layer.entry("big")
    first = layer.spans_of(big)[0]
    ahead = layer.index.spans[first + 2].compressed_start  # the first read-ahead request
    blob = FailingOnce(layer.server.url, layer.index.layer_digest, {ahead})
    reader = _reader(layer, tmp_path, readers, blob=blob)
    data = layer.data(big)
    second = layer.index.spans[first + 1].uncompressed_start - big.offset
    assert reader.read(big, 0, 100) == data[:100]
    assert reader.read(big, second, 100) == data[second : second + 100]
    _settle(reader)
    assert blob.failed == [ahead]
    assert reader.counters().fetch_errors == 2  # both spans of the dropped request
    assert not reader.is_cached(first + 2)
    # The spans whose read-ahead failed: fetched again when read, no error seen by the reader.
    assert _read_forward(reader, big, 32 << 10) == data
    assert reader.is_cached(first + 2)


def test_a_read_waiting_on_a_failing_read_ahead_fetches_its_span_itself(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big = layer.entry("big")
    first = layer.spans_of(big)[0]
    ahead = layer.index.spans[first + 2].compressed_start
    blob = FailingOnce(layer.server.url, layer.index.layer_digest, {ahead})
    blob.hold = threading.Event()
    clock = ManualClock()
    reader = _reader(layer, tmp_path, readers, blob=blob, clock=clock)
    data = layer.data(big)
    second = layer.index.spans[first + 1].uncompressed_start - big.offset
    third = layer.index.spans[first + 2].uncompressed_start - big.offset
    reader.read(big, 0, 100)
    reader.read(big, second, 100)  # starts the read-ahead of first + 2, first + 3: held
    results: list[bytes | Exception] = []

    def read_third() -> None:
        try:
            results.append(reader.read(big, third, 1000))
        except Exception as exc:  # the assertion below shows it
            results.append(exc)

    waiter = threading.Thread(target=read_third)
    waiter.start()
    clock.wait_for_blocked(1)  # joined the read-ahead attempt
    assert not results
    blob.hold.set()  # the read-ahead request fails now
    waiter.join(TIMEOUT * 2)
    assert results == [data[third : third + 1000]]
    assert blob.failed == [ahead]


def test_two_files_read_side_by_side_each_get_their_own_read_ahead(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big, other = layer.entry("big"), layer.entry("other")
    reader = _reader(layer, tmp_path, readers)
    got: dict[str, list[bytes]] = {"big": [], "other": []}
    chunk = 24 << 10
    for step in range(0, big.size, chunk):
        got["big"].append(reader.read(big, step, chunk))
        if step < other.size:
            got["other"].append(reader.read(other, step, chunk))
    assert b"".join(got["big"]) == layer.data(big)
    assert b"".join(got["other"]) == layer.data(other)
    _settle(reader)
    wanted = set(layer.spans_of(big)) | set(layer.spans_of(other))
    assert _fetched_spans(layer) == wanted
    assert reader.counters().readahead_spans >= len(wanted) - 8
