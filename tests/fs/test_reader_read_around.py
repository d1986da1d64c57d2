"""Read-around in LayerReader: a read that misses a span of a file takes the spans after it, up
to the byte budget, along in the same Range request, never past the end of the file (scope
`file`) or of its directory's files (`directory`); off (budget 0) a miss fetches only what it
reads. Against the tests' real HTTP server answering Range requests (no FUSE)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs.cache import SpanCache
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

TIMEOUT = 5.0
SMALL = 40_000  # a small file: its own span with file-aware cuts at SMALL // 2


def _noise(seed: str, size: int = SMALL) -> bytes:
    """Incompressible: deflate ends a block every few KiB, so a file-aware cut lands near each
    small file's start."""
    return random.Random(seed).randbytes(size)


MEMBERS = [
    Member("lib/before.so", data=_data("before", 3 * SPAN_SIZE)),
    Member("lib/big.so", data=_data("big", 24 * SPAN_SIZE + 777)),
    Member("lib/other.so", data=_data("other", 8 * SPAN_SIZE)),
    *(Member(f"pkg/m{n}.pyc", data=_noise(f"m{n}")) for n in range(8)),
    Member("zzz/elsewhere.pyc", data=_noise("elsewhere", 4 * SMALL)),
]


class Layer:
    def __init__(self) -> None:
        self.tar = make_tar(MEMBERS)
        blob = compress(self.tar, "gzip")
        self.index: LayerIndex = built_index(blob, "gzip", file_cut_min=SMALL // 2)
        self.server = BlobServer(blob)

    def entry(self, name: str) -> TocEntry:
        return next(e for e in self.index.entries if e.name == name)

    def data(self, entry: TocEntry) -> bytes:
        return self.tar[entry.offset : entry.offset + entry.size]

    def spans_of(self, *names: str) -> set[int]:
        spans: set[int] = set()
        for name in names:
            entry = self.entry(name)
            spans.update(spans_for_range(self.index, entry.offset, entry.offset + entry.size))
        return spans

    def requested_spans(self) -> list[set[int]]:
        """Per Range request the server answered, the spans it covered."""
        return [
            {
                n
                for n, span in enumerate(self.index.spans)
                if first <= span.compressed_start and span.compressed_end <= last + 1
            }
            for first, last in self.server.requests
        ]


@pytest.fixture
def layer() -> Iterator[Layer]:
    made = Layer()
    yield made
    made.server.stop()


@pytest.fixture
def readers() -> Iterator[list[LayerReader]]:
    made: list[LayerReader] = []
    yield made
    for reader in made:
        reader.close()


def _reader(
    layer: Layer, cache_dir: Path, made: list[LayerReader], budget: int, scope: str = "file"
) -> LayerReader:
    reader = LayerReader(
        layer.index,
        UrlBlobSource(layer.server.url, timeout=TIMEOUT, digest=layer.index.layer_digest),
        SpanCache(cache_dir, 1 << 30),
        fetch_timeout=TIMEOUT,
        read_ahead_spans=0,  # only read-around fetches what no read asked for
        read_around_bytes=budget,
        read_around_scope=scope,
    )
    made.append(reader)
    return reader


def _compressed(layer: Layer, spans: set[int]) -> int:
    return sum(layer.index.spans[n].compressed_size for n in spans)


def test_a_miss_in_a_large_file_fetches_the_spans_after_it_in_one_request_within_the_file(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    big = layer.entry("lib/big.so")
    big_spans = sorted(layer.spans_of("lib/big.so"))
    assert len(big_spans) >= 10
    budget = _compressed(layer, set(big_spans[2:6]))  # four of big's spans
    reader = _reader(layer, tmp_path / "cache", readers, budget)
    at = big.offset + 5 * SPAN_SIZE
    missed = spans_for_range(layer.index, at, at + 1)
    assert reader.read(big, 5 * SPAN_SIZE, 4096) == layer.data(big)[5 * SPAN_SIZE :][:4096]
    [request] = layer.requested_spans()
    assert min(request) == missed.start
    assert len(request) >= 3 and _compressed(layer, request) <= budget
    assert request <= set(big_spans)
    # The spans read around are served from the cache: a read of them asks for nothing more.
    inside = layer.index.spans[max(request)].uncompressed_start - big.offset
    assert reader.read(big, inside, 100) == layer.data(big)[inside : inside + 100]
    assert len(layer.server.requests) == 1

    # Near the file's end, the request stops at its last span: never the next file's spans.
    end = big.size - 10
    assert reader.read(big, end, 10) == layer.data(big)[end:]
    last = layer.requested_spans()[-1]
    assert max(last) == big_spans[-1]
    assert not last & (layer.spans_of("lib/other.so") - set(big_spans))


def test_directory_scope_takes_the_next_small_files_of_the_directory_and_no_others(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    names = [f"pkg/m{n}.pyc" for n in range(8)]
    directory = layer.spans_of(*names)  # spans holding some of the directory's bytes
    assert len(directory) >= 8  # file-aware cuts: about one span per small file
    reader = _reader(layer, tmp_path / "cache", readers, 1 << 30, scope="directory")
    first = layer.entry(names[0])
    assert reader.read(first, 0, first.size) == layer.data(first)
    [request] = layer.requested_spans()
    assert request == directory  # the whole directory, nothing of zzz/ but a shared span
    for name in names:  # every file of it is there now, read in any order
        entry = layer.entry(name)
        assert reader.read(entry, 0, entry.size) == layer.data(entry)
    assert len(layer.server.requests) == 1
    elsewhere = layer.entry("zzz/elsewhere.pyc")
    assert reader.read(elsewhere, 0, elsewhere.size) == layer.data(elsewhere)
    beyond = layer.spans_of(elsewhere.name) - directory
    assert beyond  # a request of its own: the directory's read-around did not take it
    assert layer.requested_spans()[1:] == [beyond]


def test_off_a_miss_fetches_only_what_it_reads(
    layer: Layer, tmp_path: Path, readers: list[LayerReader]
) -> None:
    reader = _reader(layer, tmp_path / "cache", readers, 0)
    big = layer.entry("lib/big.so")
    assert reader.read(big, 5 * SPAN_SIZE, 4096) == layer.data(big)[5 * SPAN_SIZE :][:4096]
    [request] = layer.requested_spans()
    assert request == set(
        spans_for_range(layer.index, big.offset + 5 * SPAN_SIZE, big.offset + 5 * SPAN_SIZE + 4096)
    )


@pytest.mark.parametrize("scope", ["file", "directory"])
def test_random_reads_with_read_around_return_the_tars_bytes(
    layer: Layer, tmp_path: Path, readers: list[LayerReader], scope: str
) -> None:
    reader = _reader(layer, tmp_path / "cache", readers, 3 * SPAN_SIZE, scope)
    rng = random.Random(15)
    entries = [layer.entry(member.name) for member in MEMBERS]
    for _ in range(300):
        entry = rng.choice(entries)
        offset = rng.randrange(entry.size)
        size = rng.randrange(1, 3 * SPAN_SIZE)
        assert reader.read(entry, offset, size) == layer.data(entry)[offset : offset + size]
    for entry in entries:
        assert reader.read(entry, 0, entry.size) == layer.data(entry)


def test_a_bad_scope_or_budget_is_refused_naming_it(layer: Layer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scope"):
        _reader(layer, tmp_path / "a", [], 1 << 20, scope="tree")
    with pytest.raises(ValueError, match="read_around_bytes"):
        _reader(layer, tmp_path / "b", [], -1)
