"""LayerReader against a real HTTP server answering Range requests (no FUSE)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs import prefetch as prefetch_module
from snapshotter.fs.blob_source import FileBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range, spans_for_range
from tests.fs.fs_helpers import (
    SPAN_SIZE,
    BlobServer,
    Member,
    _data,
    built_index,
    compress,
    make_tar,
    rich_members,
)

TIMEOUT = 3.0
BLOBS: dict[str, bytes] = {}


@pytest.fixture(params=["tar", "gzip", "zstd"])
def layer(request: pytest.FixtureRequest) -> tuple[bytes, LayerIndex]:
    """(uncompressed tar, index); the blob served is BLOBS[index.layer_digest]."""
    tar = make_tar(rich_members())
    blob = compress(tar, request.param)
    index = built_index(blob, request.param)
    BLOBS[index.layer_digest] = blob
    return tar, index


@pytest.fixture
def server(layer: tuple[bytes, LayerIndex]) -> Iterator[BlobServer]:
    instance = BlobServer(BLOBS[layer[1].layer_digest])
    yield instance
    instance.stop()


def _reader(index: LayerIndex, url: str, cache_dir: Path, max_bytes: int = 1 << 30) -> LayerReader:
    blob = UrlBlobSource(url, timeout=TIMEOUT, digest=index.layer_digest)
    return LayerReader(index, blob, SpanCache(cache_dir, max_bytes), fetch_timeout=TIMEOUT)


def _entry(index: LayerIndex, name: str) -> TocEntry:
    return [e for e in index.entries if e.name == name][-1]


def _files(index: LayerIndex) -> list[TocEntry]:
    return [e for e in index.entries if e.type is EntryType.REG]


def test_every_file_reads_back_exactly(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    reader = _reader(index, server.url, tmp_path)
    for entry in _files(index):
        want = tar[entry.offset : entry.offset + entry.size]
        assert reader.read(entry, 0, entry.size + 10) == want, entry.name
        assert reader.read(entry, entry.size // 3, 1000) == want[entry.size // 3 :][:1000]
    assert reader.read(_entry(index, "usr/lib/big.bin"), 10**9, 10) == b""
    counters = reader.counters()
    assert counters.spans_fetched == counters.spans_cached > 0
    assert counters.cache_hits > 0 and counters.fetch_errors == 0
    reader.close()


def test_a_warm_cache_needs_no_network(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    big = _entry(index, "usr/lib/big.bin")
    _reader(index, server.url, tmp_path).read(big, 0, big.size)
    server.stop()
    second = _reader(index, server.url, tmp_path)  # another mount of the same blob
    assert second.read(big, 0, big.size) == tar[big.offset : big.offset + big.size]
    assert second.counters().range_requests == 0


def test_concurrent_readers_of_one_span_cause_one_fetch(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    big = _entry(index, "usr/lib/big.bin")
    reader = _reader(index, server.url, tmp_path)
    span = next(s for s in index.spans if s.uncompressed_start > big.offset)
    offsets = [span.uncompressed_start - big.offset + i * 2048 for i in range(16)]  # one span
    server.delay = 0.3  # every reader arrives while the fetch is in flight
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda o=o: results.append(reader.read(big, o, 2048)))
        for o in offsets
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.request_count() == 1
    assert sorted(results) == sorted(tar[big.offset + o : big.offset + o + 2048] for o in offsets)


def test_adjacent_missing_spans_share_one_request(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    _, index = layer
    big = _entry(index, "usr/lib/big.bin")
    reader = _reader(index, server.url, tmp_path)
    reader.read(big, 0, 3 * SPAN_SIZE)
    spans = spans_for_range(index, big.offset, big.offset + 3 * SPAN_SIZE)
    assert len(spans) >= 2
    assert server.request_count() == 1
    assert reader.counters().spans_fetched == len(spans)


def test_a_slow_span_does_not_block_reads_of_another(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    big = _entry(index, "usr/lib/big.bin")
    reader = _reader(index, server.url, tmp_path)
    reader.read(big, 4 * SPAN_SIZE, 10)  # warm one span
    already = server.request_count()
    server.delay = 2.0
    slow = threading.Thread(target=reader.read, args=(big, 0, 10))
    slow.start()
    server.wait_for_requests(already + 1)  # the slow span's request is out
    started = time.monotonic()
    assert reader.read(big, 4 * SPAN_SIZE, 10) == tar[big.offset + 4 * SPAN_SIZE :][:10]
    assert time.monotonic() - started < 0.5
    slow.join()


def test_a_tampered_blob_gives_an_error_never_wrong_bytes(
    layer: tuple[bytes, LayerIndex], tmp_path: Path
) -> None:
    tar, index = layer
    blob = BLOBS[index.layer_digest]
    big = _entry(index, "usr/lib/big.bin")
    span = index.spans[next(iter(_spans_of(index, big.offset + 100)))]
    tampered = bytearray(blob)
    tampered[(span.compressed_start + span.compressed_end) // 2] ^= 0xFF
    server = BlobServer(bytes(tampered))
    try:
        reader = _reader(index, server.url, tmp_path)
        with pytest.raises(SpanReadError) as failure:
            reader.read(big, 100, 200)
        assert index.layer_digest in str(failure.value) and "span" in str(failure.value)
        assert reader.counters().fetch_errors >= 1
        server.blob = blob  # repaired: the next read retries and succeeds
        assert reader.read(big, 100, 200) == tar[big.offset + 100 : big.offset + 300]
    finally:
        server.stop()


def _spans_of(index: LayerIndex, offset: int) -> range:
    return spans_for_range(index, offset, offset + 1)


def test_a_dead_server_fails_within_the_timeout_and_recovers(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    big = _entry(index, "usr/lib/big.bin")
    reader = _reader(index, server.url, tmp_path)
    server.stop()
    started = time.monotonic()
    with pytest.raises(SpanReadError, match=r"span [0-9]+: "):
        reader.read(big, 0, 100)
    assert time.monotonic() - started < TIMEOUT + 1
    server.start()
    assert reader.read(big, 0, 100) == tar[big.offset : big.offset + 100]


def test_a_cache_smaller_than_the_layer_still_serves_every_file(
    layer: tuple[bytes, LayerIndex], server: BlobServer, tmp_path: Path
) -> None:
    tar, index = layer
    limit = 3 * SPAN_SIZE
    reader = _reader(index, server.url, tmp_path, max_bytes=limit)
    for entry in _files(index):
        assert reader.read(entry, 0, entry.size) == tar[entry.offset : entry.offset + entry.size]
        assert SpanCache(tmp_path, limit).usage().bytes <= limit
    assert len(tar) > 2 * limit


def test_a_local_file_works_as_blob_source(layer: tuple[bytes, LayerIndex], tmp_path: Path) -> None:
    _, index = layer
    path = tmp_path / "blob"
    path.write_bytes(BLOBS[index.layer_digest])
    reader = LayerReader(index, FileBlobSource(str(path)), SpanCache(tmp_path / "c", 1 << 30))
    hosts = _entry(index, "etc/hosts")
    assert reader.read(hosts, 0, 100) == b"127.0.0.1 localhost\n"


def test_reads_do_not_queue_behind_the_prefetch_list(
    layer: tuple[bytes, LayerIndex],
    server: BlobServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tar, index = layer
    monkeypatch.setattr(prefetch_module, "PREFETCH_STEP_BYTES", 1)  # one slow request per span
    reader = _reader(index, server.url, tmp_path)
    every_span = list(range(len(index.spans)))
    assert len(every_span) >= 4  # two requests at a time: the list takes >= 1 s
    server.delay = 0.5
    reader.prefetch(every_span)
    last = index.spans[-1]
    entry = next(
        e
        for e in reversed(index.entries)
        if e.type is EntryType.REG and e.offset < last.uncompressed_start < e.offset + e.size
    )
    offset = last.uncompressed_start - entry.offset
    started = time.monotonic()
    assert reader.read(entry, offset, 10) == tar[entry.offset + offset :][:10]
    assert time.monotonic() - started < 1.2  # its own request, not the prefetch queue's end
    server.delay = 0.0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and reader.counters().spans_fetched < len(every_span):
        time.sleep(0.1)
    assert all(reader.cache.contains(index.layer_digest, n) for n in every_span)


def test_two_indexes_of_one_blob_sharing_a_cache_each_read_their_own_spans(
    tmp_path: Path,
) -> None:
    # A 5 MiB uncompressed layer indexed with 1 MiB and with 4 MiB spans: span 1 is 1 MiB in
    # both, [1, 2) MiB in one and [4, 5) MiB in the other. Mounts of both share the cache.
    from snapshotter.index.build import build_layer_index
    from tests.fs.fs_helpers import Member, _data

    mib = 1 << 20
    tar = make_tar([Member("big", data=_data("big", 5 * mib - 3 * 512))])
    assert len(tar) == 5 * mib
    path = tmp_path / "blob"
    path.write_bytes(tar)
    media_type = "application/vnd.oci.image.layer.v1.tar"
    small = build_layer_index(io.BytesIO(tar), media_type=media_type, span_size=mib)
    large = build_layer_index(io.BytesIO(tar), media_type=media_type, span_size=4 * mib)
    assert small.spans[1].uncompressed_size == large.spans[1].uncompressed_size
    cache = SpanCache(tmp_path / "cache", 1 << 30)
    entry = _entry(small, "big")
    want = tar[entry.offset : entry.offset + entry.size]
    first = LayerReader(small, FileBlobSource(str(path)), cache)
    second = LayerReader(large, FileBlobSource(str(path)), cache)
    try:
        assert first.read(entry, 0, entry.size) == want
        assert second.read(entry, 0, entry.size) == want
        assert first.read(entry, 0, entry.size) == want  # and back, after the second's puts
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_reads_of_adjacent_spans_queued_behind_busy_workers_share_one_request(
    kind: str, tmp_path: Path
) -> None:
    # The kernel sends several reads of one file at once, each with its own missing span: the
    # worker that takes up the first of them fetches them all in one Range request.
    tar = make_tar(
        [
            Member("lib.so", data=_data("lib", 8 * SPAN_SIZE)),
            Member("other", data=_data("other", 8 * SPAN_SIZE)),
        ]
    )
    blob = compress(tar, kind)
    index = built_index(blob, kind)
    lib, other = _entry(index, "lib.so"), _entry(index, "other")
    spans = spans_for_range(index, lib.offset, lib.offset + lib.size)[:3]
    other_span = spans_for_range(index, other.offset + other.size - 1, other.offset + other.size)[0]
    assert len(spans) == 3 and other_span > spans[-1] + 1
    server = BlobServer(blob)
    reader = LayerReader(
        index,
        UrlBlobSource(server.url, timeout=TIMEOUT, digest=index.layer_digest),
        SpanCache(tmp_path, 1 << 30),
        workers=1,
        fetch_timeout=10 * TIMEOUT,
        read_ahead_spans=0,
    )
    held = threading.Event()
    server.gates[fetch_range(index, other_span)[0]] = held  # the one worker: busy with it
    results: dict[int, bytes] = {}

    def read_span(span_no: int) -> None:
        offset = max(index.spans[span_no].uncompressed_start, lib.offset) - lib.offset
        results[span_no] = reader.read(lib, offset, 100)

    busy = threading.Thread(target=reader.read, args=(other, other.size - 1, 1))
    busy.start()
    server.wait_for_requests(1)
    readers = [threading.Thread(target=read_span, args=(span_no,)) for span_no in spans]
    for thread in readers:
        thread.start()
    deadline = time.monotonic() + TIMEOUT
    while reader.counters().demand_misses < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # each read claims its span, then waits for it
    assert reader.counters().demand_misses == 4
    held.set()
    for thread in [busy, *readers]:
        thread.join()
    assert server.request_count() == 2  # the held span's, then one for the three
    assert server.requests[1] == (
        fetch_range(index, spans[0])[0],
        fetch_range(index, spans[2])[1] - 1,
    )
    for span_no, data in results.items():
        offset = max(index.spans[span_no].uncompressed_start, lib.offset)
        assert data == tar[offset : offset + 100]
    reader.close()
    server.stop()
