"""LayerReader min_fetch_bytes: a small demand miss takes the next spans of its file along in
its one Range request, never spans of another file, never past a span it holds already.
Against the tests' real HTTP server answering Range requests (no FUSE)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range, spans_for_range
from tests.fs.fs_helpers import (
    SPAN_SIZE,
    BlobServer,
    Member,
    _data,
    built_index,
    compress,
    make_tar,
)

TIMEOUT = 5.0


@pytest.fixture
def served() -> Iterator[tuple[bytes, LayerIndex, BlobServer]]:
    tar = make_tar(
        [
            Member("first", data=_data("first", 12 * SPAN_SIZE)),
            Member("second", data=_data("second", 12 * SPAN_SIZE)),
        ]
    )
    blob = compress(tar, "gzip")
    server = BlobServer(blob)
    yield tar, built_index(blob, "gzip"), server
    server.stop()


def _reader(index: LayerIndex, server: BlobServer, cache: Path, min_fetch: int) -> LayerReader:
    source = UrlBlobSource(server.url, timeout=TIMEOUT, digest=index.layer_digest)
    return LayerReader(
        index,
        source,
        SpanCache(cache, 1 << 30),
        fetch_timeout=TIMEOUT,
        read_ahead_spans=0,  # only the take-along fetches ahead
        min_fetch_bytes=min_fetch,
    )


def _entry(index: LayerIndex, name: str) -> TocEntry:
    return next(e for e in index.entries if e.name == name)


def test_a_small_miss_takes_the_next_spans_of_its_file_along(
    served: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    tar, index, server = served
    first = _entry(index, "first")
    spans = spans_for_range(index, first.offset, first.offset + first.size)
    start = spans[1]  # a read inside the file's second span
    min_fetch = sum(index.spans[n].compressed_size for n in range(start, start + 3))
    reader = _reader(index, server, tmp_path, min_fetch)
    try:
        offset = index.spans[start].uncompressed_start - first.offset + 10
        got = reader.read(first, offset, 100)
        assert got == tar[first.offset + offset : first.offset + offset + 100]
        # one request: the span read and the next two of the file, to reach min_fetch
        (request,) = server.requests
        assert (request[0], request[1] + 1) == (
            fetch_range(index, start)[0],
            fetch_range(index, start + 2)[1],
        )
        # reads of the spans taken along are served from that request (in flight or cached)
        later = index.spans[start + 2].uncompressed_start - first.offset
        assert reader.read(first, later, 100) == tar[first.offset + later :][:100]
        assert len(server.requests) == 1
    finally:
        reader.close()


def test_a_miss_takes_no_span_of_another_file_and_stops_at_a_held_one(
    served: tuple[bytes, LayerIndex, BlobServer], tmp_path: Path
) -> None:
    tar, index, server = served
    first, second = _entry(index, "first"), _entry(index, "second")
    spans = spans_for_range(index, first.offset, first.offset + first.size)
    reader = _reader(index, server, tmp_path, 1 << 30)  # take everything it may
    try:
        # the file's last span: nothing after it belongs to the file
        last = index.spans[spans[-1]]
        offset = max(last.uncompressed_start, first.offset) - first.offset
        assert reader.read(first, offset, 10) == tar[first.offset + offset :][:10]
        assert len(server.requests) == 1
        assert server.requests[0][1] + 1 == fetch_range(index, spans[-1])[1]  # none of second's
        assert spans_for_range(index, second.offset, second.offset + second.size)[-1] > spans[-1]
        # a miss before a held span stops there: the held one is not fetched again
        held = spans[-1]
        middle = spans[len(spans) // 2]
        offset = index.spans[middle].uncompressed_start - first.offset
        assert reader.read(first, offset, 10) == tar[first.offset + offset :][:10]
        assert len(server.requests) == 2
        assert server.requests[1][1] + 1 == fetch_range(index, held - 1)[1]
        for n in range(middle, held):  # all of them came in that request
            offset = max(index.spans[n].uncompressed_start, first.offset) - first.offset
            assert reader.read(first, offset, 10) == tar[first.offset + offset :][:10]
        assert len(server.requests) == 2
    finally:
        reader.close()
