"""Background fetch against a real HTTP server answering Range requests (no FUSE): the layer
converges to fully cached, on-demand reads never wait for it, and it stops at the cache bound.
The tests of quiet periods run on a manual clock, moved on whenever the fetcher waits on it."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs.activity import BUSY_REQUESTS, MAX_BUSY_DEFERRAL_S
from snapshotter.fs.background import (
    CACHE_HIGH_WATER,
    ERROR_BACKOFF_S,
    MAX_BAD_DATA_FAILURES,
    BackgroundFetcher,
    BackgroundSettings,
    BackgroundState,
)
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.clock import Clock
from snapshotter.fs.reader import LayerReader
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range
from tests.fs.fs_helpers import (
    BlobServer,
    Member,
    built_index,
    compress,
    make_tar,
    rich_members,
)
from tests.fs.manual_clock import ManualClock

TIMEOUT = 3.0
FAST = BackgroundSettings(quiet_seconds=0.0, rate_bytes=1 << 30)


@pytest.fixture(params=["tar", "gzip", "zstd"])
def layer(request: pytest.FixtureRequest) -> Iterator[tuple[bytes, LayerIndex, BlobServer]]:
    tar = make_tar(rich_members())
    blob = compress(tar, request.param)
    server = BlobServer(blob)
    yield tar, built_index(blob, request.param), server
    server.stop()


def _reader(index: LayerIndex, server: BlobServer, cache: SpanCache) -> LayerReader:
    blob = UrlBlobSource(server.url, timeout=TIMEOUT, digest=index.layer_digest)
    return LayerReader(index, blob, cache, fetch_timeout=TIMEOUT, clock=cache.clock)


def _files(index: LayerIndex) -> list[TocEntry]:
    return [e for e in index.entries if e.type is EntryType.REG and e.size]


def _state(fetcher: BackgroundFetcher) -> BackgroundState:
    return fetcher.state  # read through a call: the thread changes it behind mypy's back


def _run(fetcher: BackgroundFetcher) -> None:
    fetcher.start()
    fetcher.join(30)
    assert not fetcher.is_alive()


def _drive(
    clock: ManualClock,
    fetcher: BackgroundFetcher,
    each_step: Callable[[], None] = lambda: None,
    step: float = 0.5,
    limit: float = 60.0,
) -> None:
    """Move the clock on by step (after each_step) whenever the started fetcher waits on it,
    until it ends or limit seconds of the clock passed."""
    end = clock.monotonic() + limit
    while fetcher.is_alive() and clock.monotonic() < end:
        clock.wait_for_blocked(1, unless=lambda: not fetcher.is_alive())
        if fetcher.is_alive():
            each_step()
            clock.advance(step)
    fetcher.stop()
    fetcher.join(10)


def test_a_quiet_layer_converges_to_fully_cached(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    tar, index, server = layer
    reader = _reader(index, server, SpanCache(tmp_path / "cache", 1 << 30))
    fetcher = BackgroundFetcher(reader, FAST)
    _run(fetcher)
    assert fetcher.state is BackgroundState.COMPLETE
    assert all(reader.is_cached(n) for n in range(len(index.spans)))
    counters = reader.counters()
    assert counters.background_spans == len(index.spans) == server.request_count()
    assert counters.background_bytes == sum(
        end - begin for begin, end in (fetch_range(index, n) for n in range(len(index.spans)))
    )
    server.stop()  # everything is local now
    for entry in _files(index):
        assert reader.read(entry, 0, entry.size) == tar[entry.offset : entry.offset + entry.size]
    assert reader.counters().fetch_errors == 0
    reader.close()


def test_spans_already_cached_are_not_fetched_again(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    _, index, server = layer
    cache = SpanCache(tmp_path / "cache", 1 << 30)
    first = _reader(index, server, cache)
    big = next(e for e in _files(index) if e.name == "usr/lib/big.bin")
    first.read(big, 0, big.size)
    already = server.request_count()
    cached = sum(first.is_cached(n) for n in range(len(index.spans)))
    second = _reader(index, server, cache)  # another mount of the same blob
    fetcher = BackgroundFetcher(second, FAST)
    _run(fetcher)
    assert fetcher.state is BackgroundState.COMPLETE
    assert second.counters().background_spans == len(index.spans) - cached
    assert server.request_count() == already + len(index.spans) - cached


def test_an_on_demand_read_does_not_wait_for_the_background_fetch(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    tar, index, server = layer
    reader = _reader(index, server, SpanCache(tmp_path / "cache", 1 << 30))
    held = threading.Event()
    server.gates[fetch_range(index, 0)[0]] = held  # the background's first request hangs
    fetcher = BackgroundFetcher(reader, FAST)
    fetcher.start()
    try:
        # The read must come after the background's request is in flight; before it, the
        # background would rightly wait for the read to finish and the race proves nothing.
        server.wait_for_requests(1)
        assert server.requests[0][0] == fetch_range(index, 0)[0], server.requests
        last = len(index.spans) - 1
        entry = next(
            e
            for e in reversed(_files(index))
            if e.offset <= index.spans[last].uncompressed_start < e.offset + e.size
        )
        offset = index.spans[last].uncompressed_start - entry.offset
        # Answered while the background request is still held: it took another path.
        assert reader.read(entry, offset, 100) == tar[entry.offset + offset :][:100]
        assert not held.is_set()
        assert fetcher.state is BackgroundState.FETCHING
        assert reader.counters().background_spans == 0
        assert reader.counters().demand_misses == 1
    finally:
        held.set()
    fetcher.join(30)
    assert _state(fetcher) is BackgroundState.COMPLETE
    # The span the read fetched was not fetched twice.
    assert reader.counters().background_spans == len(index.spans) - 1


def test_background_fetch_waits_while_reads_miss(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    _, index, server = layer
    reader = _reader(index, server, SpanCache(tmp_path / "cache", 1 << 30))
    fetcher = BackgroundFetcher(reader, BackgroundSettings(quiet_seconds=600, rate_bytes=1 << 30))
    fetcher.start()
    try:
        entry = _files(index)[0]
        reader.read(entry, 0, entry.size)
        assert fetcher.state is BackgroundState.WAITING
        assert reader.counters().background_spans == 0
        assert server.request_count() == 1  # only the read's own request
    finally:
        fetcher.stop()
        fetcher.join(5)
    assert _state(fetcher) is BackgroundState.STOPPED


@pytest.mark.parametrize("foreground", ["miss", "prefetch"])
def test_another_layers_foreground_fetch_keeps_background_fetch_waiting(
    foreground: str, tmp_path: Path
) -> None:
    # Two layers of one node: a container still starting on one of them (its reads miss, or
    # its profile is being prefetched) must not share the link and the CPU with the other
    # layer's background fetch.
    clock = ManualClock()
    servers, starting, quiet = _two_layers(tmp_path, clock)
    fetcher = BackgroundFetcher(quiet, BackgroundSettings(quiet_seconds=2.0, rate_bytes=1 << 30))
    try:
        clock.advance(2.2)  # the quiet layer alone has been quiet long enough
        if foreground == "miss":
            entry = _files(starting.index)[0]
            starting.read(entry, 0, entry.size)
        else:
            starting.prefetch(range(len(starting.index.spans)))
            deadline = time.monotonic() + 10
            while starting.counters().prefetch_spans == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        fetcher.start()
        clock.wait_for_blocked(1)
        assert _state(fetcher) is BackgroundState.WAITING
        assert quiet.counters().background_spans == 0
        _drive(clock, fetcher)  # the node is quiet 2 s after that fetch: it runs to the end
        assert _state(fetcher) is BackgroundState.COMPLETE
    finally:
        fetcher.stop()
        for server in servers:
            server.stop()


def test_background_fetch_stops_at_the_cache_bound_without_evicting(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    _, index, server = layer
    largest = max(span.uncompressed_size for span in index.spans)
    bound = 4 * largest  # room for about three spans below the high-water mark
    assert len(index.spans) > 4
    cache = SpanCache(tmp_path / "cache", bound)
    reader = _reader(index, server, cache)
    fetcher = BackgroundFetcher(reader, FAST)
    _run(fetcher)
    assert fetcher.state is BackgroundState.CACHE_FULL
    fetched = reader.counters().background_spans
    assert 1 <= fetched < len(index.spans)
    assert cache.usage().bytes <= bound * CACHE_HIGH_WATER
    # Nothing the background stored was evicted to make room for more of it.
    assert cache.usage().spans == fetched == sum(reader.is_cached(n) for n in range(fetched))


def test_bad_settings_are_refused_with_the_key_named() -> None:
    with pytest.raises(ValueError, match="rate_bytes"):
        BackgroundSettings(rate_bytes=0)
    with pytest.raises(ValueError, match="quiet_seconds"):
        BackgroundSettings(quiet_seconds=-1)


def _two_layers(tmp_path: Path, clock: Clock) -> tuple[list[BlobServer], LayerReader, LayerReader]:
    """A layer a container is starting on, and a quiet one, sharing one node's span cache."""
    servers = []
    readers = []
    cache = SpanCache(tmp_path / "cache", 1 << 30, clock=clock)
    for variant in range(2):
        members = [*rich_members(), Member(f"layer-{variant}", data=b"x" * 1000)]
        blob = compress(make_tar(members), "gzip")
        servers.append(BlobServer(blob))
        readers.append(_reader(built_index(blob, "gzip"), servers[-1], cache))
    return servers, readers[0], readers[1]


def _serve_lookups(starting: LayerReader, count: int) -> None:
    """What a container's start sends the mount: lookups (getattr) of its files, all answered
    from the tree, nothing fetched."""
    from snapshotter.fs.fuse_ops import LayerOperations
    from snapshotter.fs.tree import LayerTree

    tree = LayerTree.from_index(starting.index)
    operations = LayerOperations(tree, starting)
    names = [path for path, _ in tree.walk()]
    for i in range(count):
        operations.getattr("/" + names[i % len(names)])


def test_a_busy_mount_keeps_background_fetch_waiting_without_any_fetch(tmp_path: Path) -> None:
    # A profiled start misses nothing: its files are cached already, yet it still works the
    # two cores hard; background inflating (and the copy to plain files after it) waits.
    clock = ManualClock()
    servers, starting, quiet = _two_layers(tmp_path, clock)
    fetcher = BackgroundFetcher(quiet, BackgroundSettings(quiet_seconds=2.0, rate_bytes=1 << 30))
    try:
        clock.advance(2.2)  # no fetch anywhere for longer than the quiet period
        _serve_lookups(starting, 500)
        assert starting.counters().demand_misses == 0
        fetcher.start()
        clock.wait_for_blocked(1)
        assert _state(fetcher) is BackgroundState.WAITING
        assert quiet.counters().background_spans == 0
        _drive(clock, fetcher)  # 2 s after the burst the node is quiet: it runs to the end
        assert _state(fetcher) is BackgroundState.COMPLETE
    finally:
        fetcher.stop()
        for server in servers:
            server.stop()


def test_a_few_requests_do_not_make_the_node_busy(tmp_path: Path) -> None:
    # A long-running service reading a file now and then must not hold convergence back.
    clock = ManualClock()
    servers, starting, quiet = _two_layers(tmp_path, clock)
    fetcher = BackgroundFetcher(quiet, BackgroundSettings(quiet_seconds=2.0, rate_bytes=1 << 30))
    try:
        clock.advance(2.2)  # no fetch anywhere for longer than the quiet period
        _serve_lookups(starting, BUSY_REQUESTS - 1)
        fetcher.start()
        # Not deferred: its first wait on the clock is its pacing after a span it fetched.
        clock.wait_for_blocked(1, unless=lambda: not fetcher.is_alive())
        assert quiet.counters().background_spans >= 1
        _drive(clock, fetcher)
        assert _state(fetcher) is BackgroundState.COMPLETE
    finally:
        fetcher.stop()
        for server in servers:
            server.stop()


def test_a_node_that_never_stops_being_busy_still_converges(tmp_path: Path) -> None:
    clock = ManualClock()
    servers, starting, quiet = _two_layers(tmp_path, clock)
    fetcher = BackgroundFetcher(quiet, BackgroundSettings(quiet_seconds=2.0, rate_bytes=1 << 30))
    try:
        _serve_lookups(starting, 200)
        fetcher.start()
        clock.wait_for_blocked(1)
        assert _state(fetcher) is BackgroundState.WAITING  # deferring to the busy node
        # A burst of requests every half second of the clock, for as long as the fetcher
        # waits: it defers for MAX_BUSY_DEFERRAL_S at most, then runs to the end.
        _drive(
            clock,
            fetcher,
            lambda: _serve_lookups(starting, 200),
            limit=MAX_BUSY_DEFERRAL_S + 60,
        )
        assert _state(fetcher) is BackgroundState.COMPLETE
    finally:
        fetcher.stop()
        for server in servers:
            server.stop()


def test_a_span_whose_bytes_never_verify_is_given_up_and_the_rest_completes(
    layer: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    _, index, server = layer
    bad = len(index.spans) // 2
    spans = list(index.spans)
    spans[bad] = dataclasses.replace(spans[bad], digest="sha256:" + "0" * 64)
    wrong = dataclasses.replace(index, spans=tuple(spans))
    clock = ManualClock()
    reader = _reader(wrong, server, SpanCache(tmp_path / "cache", 1 << 30, clock=clock))
    fetcher = BackgroundFetcher(reader, FAST)
    fetcher.start()
    _drive(clock, fetcher, step=ERROR_BACKOFF_S, limit=3600)  # through the pauses after failures
    assert fetcher.state is BackgroundState.DEGRADED
    assert all(reader.is_cached(n) for n in range(len(index.spans)) if n != bad)
    assert not reader.is_cached(bad)
    counters = reader.counters()
    assert counters.degraded_spans == 1
    assert counters.fetch_errors == MAX_BAD_DATA_FAILURES  # then it stopped trying
    total = sum(span.compressed_size for span in index.spans)
    assert counters.bytes_verified == total - index.spans[bad].compressed_size
    assert counters.bytes_fetched > counters.bytes_verified  # the failed tries, counted apart
    reader.close()
