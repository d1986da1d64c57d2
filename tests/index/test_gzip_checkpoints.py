"""The gzip builder places zran's checkpoints itself: the same ones indexed_gzip places (it is the
reference implementation of the rule), with either C inflate library, however the stream is cut
into reads, and it refuses hostile streams in bounded memory."""

from __future__ import annotations

import dataclasses
import gzip
import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import indexed_gzip
import pytest

from snapshotter.index.block_inflate import load_inflate_library
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import MAX_SPAN_UNCOMPRESSED
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.gzip_spans import GzipSpanBuilder
from snapshotter.index.model import LayerIndex, Span
from tests.index.conftest import GZIP_MT, TEST_SPAN_SIZE, Layer, OnlyRead

GZIP_LAYERS = ["python-gzip", "pigz", "multi-member"]
_EXPORT_HEADER = struct.Struct("<5sBBQQIII")
_EXPORT_POINT = struct.Struct("<QQBB")


def zran_checkpoints(blob: bytes, span_size: int) -> list[tuple[int, int, int, bool]]:
    """(compressed_start, uncompressed_start, bits, has window) of every span after the first,
    from indexed_gzip's exported index, with the builder's documented rules applied."""
    with indexed_gzip.IndexedGzipFile(fileobj=io.BytesIO(blob), spacing=span_size) as zran:
        zran.build_full_index()
        exported = io.BytesIO()
        zran.export_index(fileobj=exported)
        total = zran.seek(0, io.SEEK_END)
    data = exported.getvalue()
    magic, *_, npoints = _EXPORT_HEADER.unpack_from(data)
    assert magic == b"GZIDX"
    by_offset: dict[int, tuple[int, int, int, bool]] = {}
    for i in range(npoints):
        cmp, out, bits, has_window = _EXPORT_POINT.unpack_from(
            data, _EXPORT_HEADER.size + i * _EXPORT_POINT.size
        )
        if 0 < out < total:  # span 0 starts at the header; nothing starts at the end
            by_offset[out] = (cmp - (1 if bits else 0), out, bits, bool(has_window))
    return [by_offset[out] for out in sorted(by_offset)]  # the later point at an offset wins


def build_spans(
    blob: bytes, span_size: int, library: str, read: Callable[[int], bytes] | None = None
) -> list[Span]:
    reader = read or io.BytesIO(blob).read
    spans, csize, _usize = GzipSpanBuilder(
        reader, lambda _view: None, span_size, load_inflate_library(library)
    ).run()
    assert csize == len(blob)
    return spans


@pytest.mark.parametrize("name", GZIP_LAYERS)
def test_checkpoints_are_the_ones_zran_places(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    layer, index = layers[name], built[name]
    ours = [
        (s.compressed_start, s.uncompressed_start, s.bits, bool(s.window)) for s in index.spans[1:]
    ]
    assert ours == zran_checkpoints(layer.blob, TEST_SPAN_SIZE)
    for span in index.spans[1:]:
        if span.window:  # the deflate history: the 32 KiB of tar before the checkpoint
            assert (
                span.window == layer.tar[span.uncompressed_start - 32768 : span.uncompressed_start]
            )


@pytest.mark.parametrize("name", GZIP_LAYERS)
def test_zlib_and_zlib_ng_cut_identical_spans(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    assert build_spans(layers[name].blob, TEST_SPAN_SIZE, "zlib") == list(built[name].spans)


@pytest.mark.parametrize("name", GZIP_LAYERS)
def test_an_index_built_with_system_zlib_is_the_same_index(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    """The fallback where zlib-ng is unusable (and bench.index_build --system-zlib) only changes
    the speed of build_layer_index."""
    zlib_library = load_inflate_library("zlib")
    calls = 0

    def counted_inflate(*args: object) -> int:
        nonlocal calls
        calls += 1
        return zlib_library.inflate(*args)

    layer = layers[name]
    index = build_layer_index(
        OnlyRead(layer.blob),
        media_type=layer.media_type,
        span_size=TEST_SPAN_SIZE,
        inflate_library=dataclasses.replace(zlib_library, inflate=counted_inflate),
    )
    assert calls > 0  # the library given inflated the layer
    assert index == built[name]


def test_tiny_reads_cut_the_same_spans(
    layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    """Member headers and the byte a checkpoint shares with the span before fall across reads."""
    layer = layers["multi-member"]
    stream = io.BytesIO(layer.blob)
    spans = build_spans(layer.blob, TEST_SPAN_SIZE, "zlib-ng", lambda n: stream.read(min(n, 997)))
    assert spans == list(built["multi-member"].spans)


def test_unknown_inflate_library_is_named() -> None:
    with pytest.raises(ValueError, match="'zlib-foo'"):
        load_inflate_library("zlib-foo")


def endless_block_gzip(output_size: int) -> bytes:
    """A gzip member whose one fixed-Huffman block repeats 258-byte matches for output_size bytes
    and never ends: no block boundary anywhere, ~1 compressed byte per 160 output bytes."""
    bits: list[int] = [0, 1, 0]  # BFINAL=0, BTYPE=01 (fixed), least significant bit first

    def code(value: int, length: int) -> None:  # Huffman codes go most significant bit first
        bits.extend(value >> (length - 1 - i) & 1 for i in range(length))

    code(0x30 + ord("a"), 8)  # literal 'a'
    prefix = len(bits)
    for _ in range(16):  # every 8 x 13 bits = 13 bytes the byte pattern repeats
        code(0b11000101, 8)  # length 258
        code(0, 5)  # distance 1
    packed = bytes(
        sum(bit << i for i, bit in enumerate(bits[at : at + 8])) for at in range(0, len(bits), 8)
    )
    head, period = packed[: prefix // 8 + 1], packed[prefix // 8 + 1 : prefix // 8 + 14]
    assert len(period) == 13 and (prefix // 8 + 1) * 8 - prefix == 5
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + head + period * (output_size // (8 * 258) + 1)


def test_a_block_too_long_to_index_is_refused_early_in_bounded_memory() -> None:
    blob = endless_block_gzip(MAX_SPAN_UNCOMPRESSED + (64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidLayer, match=r"span 0 inflates to more than .*not randomly"):
            build_spans(blob, TEST_SPAN_SIZE, "zlib-ng")  # a null sink: no tar parser to refuse
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"builder held {peak} bytes: it buffers instead of streaming"


def test_non_zero_bytes_after_padding_are_refused() -> None:
    blob = gzip.compress(bytes(10240)) + bytes(100) + b"\x1f\x8b"
    with pytest.raises(InvalidLayer, match="non-zero bytes after zero padding"):
        build_layer_index(OnlyRead(blob), media_type=GZIP_MT)


def test_stream_ending_inside_a_member_header_is_refused() -> None:
    blob = gzip.compress(bytes(10240)) + gzip.compress(b"x")[:5]
    with pytest.raises(InvalidLayer, match=r"truncated .*member header"):
        build_layer_index(OnlyRead(blob), media_type=GZIP_MT)


def test_zlib_stream_labelled_gzip_is_refused() -> None:
    blob = b"\x1f\x8b" + zlib.compress(bytes(10240))
    with pytest.raises(InvalidLayer, match="gzip layer is corrupt"):
        build_layer_index(OnlyRead(blob), media_type=GZIP_MT)


def test_builds_in_parallel_threads_do_not_interfere(
    layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    """inflate runs without the GIL: each builder must own every buffer it hands to C."""
    names = ["pigz", "multi-member", "python-gzip", "pigz"]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: layers[name].build(), names))
    assert results == [built[name] for name in names]
