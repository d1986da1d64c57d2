"""Random access through an index: which spans hold a byte range, what to fetch, how to inflate.

inflate_span is called from several threads at once. It keeps no shared mutable state except a per-
thread zstd decompression context, and zlib-ng/zstd release the GIL while they inflate. Gzip spans
resume at a zran checkpoint without inflatePrime (Python zlib bindings lack it): when the
checkpoint is `bits` bits into byte compressed_start, the other bits of that byte are replaced by
empty deflate blocks of a length that ends the prefix on a byte boundary (see _realign), then the
bytes are inflated raw with the 32 KiB window as preset dictionary. No slack beyond compressed_end
is needed: every checkpoint sits on a deflate block boundary, so all bits of the span's output lie
before compressed_end and zlib's slow path decodes symbols from exactly the bits present.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable

import zstandard
from zlib_ng import zlib_ng as zlib  # zlib-ng: same API and format, ~2.5x faster inflate

from snapshotter.index.errors import SpanVerificationError
from snapshotter.index.model import Compression, EntryType, LayerIndex, Span, TocEntry

# zlib_ng's stub declares `error` as an instance; it is the exception class at runtime
_ZLIB_ERROR: type[Exception] = zlib.error  # type: ignore[assignment]

_local = threading.local()
# A hard link to a hard link is resolved this far: tars never chain them, a hostile one may loop.
MAX_HARDLINK_HOPS = 8
# Span 0 of a gzip layer may hold empty members after the first (a checkpoint starts every
# member that has data); no writer makes thousands, and each costs a fresh inflater.
MAX_MEMBERS_PER_SPAN = 4096
MEMBER_CHUNK = 64 << 10


def spans_for_range(index: LayerIndex, start: int, end: int) -> range:
    """Span numbers covering uncompressed bytes [start, end) (clamped to the layer)."""
    end = min(end, index.uncompressed_size)
    start = max(start, 0)
    if start >= end:
        return range(0)
    first = bisect.bisect_right(index.spans, start, key=lambda s: s.uncompressed_start) - 1
    last = bisect.bisect_left(index.spans, end, key=lambda s: s.uncompressed_start)
    return range(max(first, 0), last)


def spans_for_files(index: LayerIndex, names: Iterable[str]) -> list[int]:
    """Spans holding the data of the named files, in the order the names come, each span once.
    Names the layer holds no data for (absent, not a regular file, empty) are skipped. As in the
    layer's tree, a name the tar holds twice means its last entry, and a hard link its target's
    data. Needs no tree: a mount process computes its startup prefetch with this before building
    its tree, so the first Range requests go out that much sooner."""
    by_name: dict[str, TocEntry] = {entry.name: entry for entry in index.entries}
    wanted: list[int] = []
    seen: set[int] = set()
    for name in names:
        entry = by_name.get("/".join(part for part in name.split("/") if part not in ("", ".")))
        for _ in range(MAX_HARDLINK_HOPS):
            if entry is None or entry.type is not EntryType.HARDLINK:
                break
            entry = by_name.get(entry.link_target)
        if entry is None or entry.type is not EntryType.REG or entry.size == 0:
            continue
        for span_no in spans_for_range(index, entry.offset, entry.offset + entry.size):
            if span_no not in seen:
                seen.add(span_no)
                wanted.append(span_no)
    return wanted


def fetch_range(index: LayerIndex, span_no: int) -> tuple[int, int]:
    """Compressed [start, end) to fetch for span `span_no`: exactly the span (no slack)."""
    span = index.spans[span_no]
    return span.compressed_start, span.compressed_end


def _fail(index: LayerIndex, span_no: int, why: str) -> SpanVerificationError:
    return SpanVerificationError(f"layer {index.layer_digest} span {span_no}: {why}")


def _zstd_context() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "zstd", None)
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _local.zstd = dctx
    return dctx


def _bits(value: int, count: int) -> list[int]:
    """`count` bits of value, least significant first (deflate's bit order for fields)."""
    return [value >> i & 1 for i in range(count)]


# A non-final fixed-Huffman block holding only end-of-block: 10 bits, no output.
_EMPTY_FIXED = [0, *_bits(1, 2), *[0] * 7]
# A non-final dynamic-Huffman block holding only end-of-block: 93 bits, no output. Its code
# length code has two 1-bit codes (for lengths 1 and 18), and its literal and distance codes one
# 1-bit code each (zlib accepts a lone incomplete code).
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
_EMPTY_DYNAMIC = [
    0,
    *_bits(2, 2),
    *_bits(0, 5),  # HLIT: 257 literal/length codes
    *_bits(0, 5),  # HDIST: 1 distance code
    *_bits(15, 4),  # HCLEN: all 19 code length codes
    *[b for sym in _CL_ORDER for b in _bits(1 if sym in (1, 18) else 0, 3)],
    1, *_bits(138 - 11, 7),  # 138 zero lengths (symbol 18, code "1")
    1, *_bits(118 - 11, 7),  # 118 more: literals 0-255 unused
    0,  # length 1 for end-of-block (symbol 1, code "0")
    0,  # length 1 for distance 0
    0,  # the block's only symbol: end-of-block
]  # fmt: skip


def _pack(bits: list[int]) -> bytes:
    return bytes(
        sum(bit << i for i, bit in enumerate(bits[k : k + 8])) for k in range(0, len(bits), 8)
    )


def _prefix_for(bits: int) -> list[int]:
    """Empty deflate blocks of P bits with P + bits a multiple of 8 (fixed: 10 bits = 2 mod 8,
    dynamic: 93 bits = 5 mod 8, so every residue is reachable)."""
    residue = (8 - bits) % 8
    if residue % 2 == 0:
        return _EMPTY_FIXED * (residue // 2)
    return _EMPTY_DYNAMIC + _EMPTY_FIXED * (((residue - 5) // 2) % 4)


# Byte-aligned replacements for a checkpoint's partial first byte, one per `bits` value.
_HEADS = {bits: (_prefix_for(bits), bits) for bits in range(1, 8)}


def _realign(data: bytes, bits: int) -> bytes:
    """Resume mid-byte without inflatePrime: the first byte's low 8 - bits bits belong to the
    previous span; replace them by empty deflate blocks so the checkpoint's `bits` bits end on a
    byte boundary. Later bytes keep their alignment, which stored blocks depend on."""
    prefix, count = _HEADS[bits]
    head = prefix + _bits(data[0] >> (8 - bits), count)
    return _pack(head) + data[1:]


def _inflate_gzip(span: Span, data: bytes, window: bytes) -> bytes:
    if span.compressed_start == 0:
        return _inflate_members(span, data)
    if span.bits:
        data = _realign(data, span.bits)
    inflater = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
    # one more byte than expected is asked for so an overlong span is noticed
    return inflater.decompress(data, span.uncompressed_size + 1)


def _inflate_members(span: Span, data: bytes) -> bytes:
    """Span 0: the gzip header, and maybe more (empty) members after the first. Input goes in
    MEMBER_CHUNK slices: zlib copies all input left after a member's end into unused_data, so
    feeding the whole span per member made many tiny members quadratic (a crafted 0.8 MB span
    of 40k empty members took 1.6 s, an 8 MB one minutes). Members are capped too."""
    out = bytearray()
    view = memoryview(data)
    pos = members = 0
    while pos < len(view) and len(out) < span.uncompressed_size:
        members += 1
        if members > MAX_MEMBERS_PER_SPAN:
            raise _ZLIB_ERROR(f"more than {MAX_MEMBERS_PER_SPAN} gzip members in one span")
        inflater = zlib.decompressobj(31)
        while not inflater.eof and pos < len(view) and len(out) <= span.uncompressed_size:
            chunk = view[pos : pos + MEMBER_CHUNK]
            out += inflater.decompress(chunk, span.uncompressed_size - len(out) + 1)
            pos += len(chunk) - len(inflater.unconsumed_tail) - len(inflater.unused_data)
        if not inflater.eof:
            break
    return bytes(out)


def _inflate_zstd(data: bytes, limit: int) -> bytes:
    # a reader, not decompressobj: it bounds the output even for a crafted bomb
    parts: list[bytes] = []
    with _zstd_context().stream_reader(data, read_across_frames=True) as reader:
        while limit > 0:
            chunk = reader.read(limit)
            if not chunk:
                break
            parts.append(chunk)
            limit -= len(chunk)
    return b"".join(parts)


def inflate_span(
    index: LayerIndex, span_no: int, fetched: bytes, window: bytes | None = None
) -> bytes:
    """Verify the fetched compressed bytes of a span, inflate them, verify the result.

    `fetched` is blob[fetch_range(index, span_no)]; `window` the span's window when the index
    keeps windows in a windows blob (codec.decode_window of the span's frame), None for the
    inline one (span.window). Raises SpanVerificationError on any mismatch (digest, length,
    corrupt data): a wrong window makes the inflated bytes fail the uncompressed digest."""
    span = index.spans[span_no]
    if window is None:
        if span.window_length:
            raise _fail(index, span_no, "its window (in the windows blob) was not given")
        window = span.window
    if len(fetched) != span.compressed_size:
        raise _fail(
            index, span_no, f"got {len(fetched)} compressed bytes, expected {span.compressed_size}"
        )
    if "sha256:" + hashlib.sha256(fetched).hexdigest() != span.digest:
        raise _fail(index, span_no, "compressed bytes do not match the span digest")
    try:
        if index.compression is Compression.GZIP:
            out = _inflate_gzip(span, fetched, window)
        elif index.compression is Compression.ZSTD:
            # a reader, not decompressobj: it bounds the output even for a crafted bomb
            out = _inflate_zstd(fetched, span.uncompressed_size + 1)
        else:
            out = fetched
    except (_ZLIB_ERROR, zstandard.ZstdError) as exc:
        raise _fail(index, span_no, f"inflating failed: {exc}") from None
    if len(out) != span.uncompressed_size:
        raise _fail(
            index, span_no, f"inflated to {len(out)} bytes, expected {span.uncompressed_size}"
        )
    if (
        index.compression is not Compression.NONE
        and "sha256:" + hashlib.sha256(out).hexdigest() != span.uncompressed_digest
    ):
        raise _fail(index, span_no, "inflated bytes do not match the uncompressed digest")
    return out
