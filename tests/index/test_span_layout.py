"""File-aware span cuts (build_layer_index's file_cut_min): every file still reads back exactly,
a small file no longer sits inside a whole span, the layout is deterministic, and zstd layers
(frames are never split) keep their spans."""

from __future__ import annotations

import bisect
import functools
import io
import statistics
import tracemalloc
from collections import deque

import pytest

from snapshotter.index.block_inflate import BlockInflater, load_inflate_library
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import decode_index, encode_index, encode_index_split, encode_window
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.gzip_spans import GzipSpanBuilder
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range, inflate_span, spans_for_range
from tests.index.conftest import TEST_FILE_CUT_MIN, TEST_SPAN_SIZE, Layer, OnlyRead
from tests.index.test_gzip_checkpoints import endless_block_gzip

LAYER_NAMES = ["python-gzip", "pigz", "multi-member", "tar", "zstd-frames", "zstd-unsized"]
GZIP_LAYERS = ["python-gzip", "pigz", "multi-member"]
SMALL_FILE = 4096


def _files(index: LayerIndex) -> list[TocEntry]:
    return [entry for entry in index.entries if entry.type is EntryType.REG and entry.size]


def _span_start(index: LayerIndex, offset: int) -> int:
    [number] = spans_for_range(index, offset, offset + 1)
    return index.spans[number].uncompressed_start


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_file_reads_back_equal_to_the_tar(
    name: str, layers: dict[str, Layer], built_file_cuts: dict[str, LayerIndex]
) -> None:
    layer, index = layers[name], built_file_cuts[name]
    assert decode_index(encode_index(index)) == index  # a reader of today takes the layout
    inflated: dict[int, bytes] = {}

    def span_bytes(number: int) -> bytes:
        if number not in inflated:
            start, end = fetch_range(index, number)
            inflated[number] = inflate_span(index, number, layer.blob[start:end])
        return inflated[number]

    files = _files(index)
    assert len(files) > 1000
    for entry in files:
        data = bytearray()
        for number in spans_for_range(index, entry.offset, entry.offset + entry.size):
            span = index.spans[number]
            low = max(entry.offset, span.uncompressed_start) - span.uncompressed_start
            high = min(entry.offset + entry.size, span.uncompressed_end) - span.uncompressed_start
            data += span_bytes(number)[low:high]
        assert data == layer.tar[entry.offset : entry.offset + entry.size], entry.name
    assert len(inflated) == len(index.spans)  # every span was inflated and verified
    for span in index.spans:
        if span.window:  # a file cut is a real zran checkpoint: its window is the tar before it
            assert (
                span.window == layer.tar[span.uncompressed_start - 32768 : span.uncompressed_start]
            )


def test_uncompressed_spans_start_exactly_at_files(
    built_file_cuts: dict[str, LayerIndex],
) -> None:
    """The rule for a tar layer: a file's data starts a span unless the span it falls in began
    less than file_cut_min bytes before it."""
    index = built_file_cuts["tar"]
    for entry in _files(index):
        start = _span_start(index, entry.offset)
        assert start == entry.offset or entry.offset - start < TEST_FILE_CUT_MIN, entry.name
    assert all(span.uncompressed_size <= TEST_SPAN_SIZE for span in index.spans)


def _block_boundaries(blob: bytes) -> list[int]:
    """Uncompressed offsets of every deflate block boundary of a one-member gzip stream."""
    inflater = BlockInflater(load_inflate_library())
    boundaries, position = [0], 0
    try:
        inflater.feed(blob)
        while True:
            out, ended = inflater.inflate(1 << 20, stop_at_block=True)
            position += len(out)
            if ended:
                return boundaries
            if inflater.at_block_boundary:
                boundaries.append(position)
    finally:
        inflater.close()


@pytest.mark.parametrize("name", ["python-gzip", "pigz"])
def test_gzip_spans_start_at_the_block_before_each_file(
    name: str, layers: dict[str, Layer], built_file_cuts: dict[str, LayerIndex]
) -> None:
    """The rule for gzip: the span holding a file's first byte starts at the last deflate block
    boundary at or before it, unless the span before that boundary was shorter than
    file_cut_min."""
    index = built_file_cuts[name]
    boundaries = _block_boundaries(layers[name].blob)
    for entry in _files(index):
        block = boundaries[bisect.bisect_right(boundaries, entry.offset) - 1]
        start = _span_start(index, entry.offset)
        assert start == block or 0 <= block - start < TEST_FILE_CUT_MIN, entry.name


def _fetched_for(index: LayerIndex, entry: TocEntry) -> int:
    """Compressed bytes a reader fetches to read this file alone: spans and their windows."""
    spans = spans_for_range(index, entry.offset, entry.offset + entry.size)
    return sum(index.spans[n].compressed_size + _window_size(index.spans[n].window) for n in spans)


@functools.cache
def _window_size(window: bytes) -> int:
    return len(encode_window(window)) if window else 0


@pytest.mark.parametrize("name", [*GZIP_LAYERS, "tar"])
def test_reading_a_small_file_fetches_a_few_blocks_not_a_span(
    name: str, built: dict[str, LayerIndex], built_file_cuts: dict[str, LayerIndex]
) -> None:
    sized, file_aware = built[name], built_file_cuts[name]
    small = [entry for entry in _files(file_aware) if entry.size <= SMALL_FILE]
    assert len(small) > 200
    before = statistics.median(_fetched_for(sized, entry) for entry in small)
    after = statistics.median(_fetched_for(file_aware, entry) for entry in small)
    # by size a small file costs its whole 256 KiB span (medians here: 78-94 KB compressed with
    # window; tar 262 KB); with file cuts its own deflate block(s) (~35 KB)
    assert after * 2 < before, (before, after)
    assert len(file_aware.spans) < 4 * len(sized.spans)


@pytest.mark.parametrize("name", ["pigz", "multi-member", "tar"])
def test_file_aware_layout_is_deterministic(
    name: str, layers: dict[str, Layer], built_file_cuts: dict[str, LayerIndex]
) -> None:
    """Same bytes + same options: the same index and windows blobs, however the stream is
    cut into reads."""
    layer = layers[name]
    again = build_layer_index(
        OnlyRead(layer.blob, 997),
        media_type=layer.media_type,
        span_size=TEST_SPAN_SIZE,
        file_cut_min=TEST_FILE_CUT_MIN,
    )
    assert again == built_file_cuts[name]
    assert encode_index_split(again) == encode_index_split(built_file_cuts[name])
    assert again.spans != layer.build().spans  # the option changes the layout


@pytest.mark.parametrize("name", ["zstd-frames", "zstd-unsized"])
def test_zstd_frames_are_never_split(
    name: str, built: dict[str, LayerIndex], built_file_cuts: dict[str, LayerIndex]
) -> None:
    assert built_file_cuts[name] == built[name]


def test_a_block_too_long_to_hold_is_hashed_on_and_refused_in_bounded_memory() -> None:
    """File-aware cuts hold a block's bytes until it ends; an endless block must not make
    them hold it all."""
    blob = endless_block_gzip((256 << 20) + (64 << 20))
    builder = GzipSpanBuilder(
        io.BytesIO(blob).read,
        lambda _view: None,
        TEST_SPAN_SIZE,
        file_cut_min=TEST_FILE_CUT_MIN,
        data_starts=deque(),
    )
    tracemalloc.start()
    try:
        with pytest.raises(InvalidLayer, match=r"span 0 inflates to more than .*not randomly"):
            builder.run()
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"builder held {peak} bytes: it buffers a whole block"


def test_negative_file_cut_minimum_is_refused(layers: dict[str, Layer]) -> None:
    with pytest.raises(InvalidLayer, match="file cut minimum -1"):
        build_layer_index(OnlyRead(b""), media_type=layers["tar"].media_type, file_cut_min=-1)
