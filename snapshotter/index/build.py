"""Build a LayerIndex from a layer blob read once from a non-seekable stream.

The caller hands in an HTTP response body (or any object with read(n)); nothing is written to
disk and nothing is read twice. Compression is taken from the media type and checked against the
blob's magic bytes, so a mislabelled layer is refused instead of mis-indexed.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.index.block_inflate import InflateLibrary
from snapshotter.index.codec import MAX_SPAN_UNCOMPRESSED, MAX_SPANS, name_limits_problem
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.gzip_spans import GzipSpanBuilder
from snapshotter.index.model import (
    DEFAULT_FILE_CUT_MIN,
    DEFAULT_SPAN_SIZE,
    MAX_SPAN_SIZE,
    MIN_SPAN_SIZE,
    Compression,
    EntryType,
    LayerIndex,
    Span,
)
from snapshotter.index.tar_toc import TarTocParser
from snapshotter.index.zstd_spans import ZSTD_MAGIC, ZstdSpanBuilder, is_skippable

_GZIP_SUFFIXES = ("tar+gzip", "tar.gzip", "rootfs.diff.tar.gzip", "tar.gz")
_ZSTD_SUFFIXES = ("tar+zstd",)
_NONE_SUFFIXES = ("layer.v1.tar", "rootfs.diff.tar", ".tar")


def compression_for_media_type(media_type: str) -> Compression:
    """OCI and Docker layer media types -> compression; anything else is refused."""
    base = media_type.split(";", 1)[0].strip().lower()
    if base.endswith(_GZIP_SUFFIXES):
        return Compression.GZIP
    if base.endswith(_ZSTD_SUFFIXES):
        return Compression.ZSTD
    if base.endswith(_NONE_SUFFIXES):
        return Compression.NONE
    raise InvalidLayer(f"layer media type {media_type!r} is not a tar, tar+gzip or tar+zstd layer")


def sniff_compression(head: bytes) -> Compression:
    """What the first bytes of a blob say (tar has no reliable magic: 'none' otherwise)."""
    if head[:2] == b"\x1f\x8b":
        return Compression.GZIP
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if magic == ZSTD_MAGIC or is_skippable(magic):
            return Compression.ZSTD
    return Compression.NONE


class ReadableStream(Protocol):
    """All the builder needs of a layer stream (an HTTP body, a file, a BinaryIO)."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass
class _BlobReader:
    """Sequential reads from the caller's stream; hashes and counts every byte once."""

    stream: ReadableStream
    progress: Callable[[int], None] | None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    consumed: int = 0
    _head: bytes = b""

    def peek(self, n: int) -> bytes:
        self._head = self._read_raw(n)
        return self._head

    def read_exact(self, n: int) -> bytes:
        """n bytes, fewer only at end of stream (HTTP bodies return short reads)."""
        head, self._head = self._head[:n], self._head[n:]
        data = head + self._read_raw(n - len(head)) if len(head) < n else head
        self.digest.update(data)
        self.consumed += len(data)
        if self.progress is not None and data:
            self.progress(len(data))
        return data

    def _read_raw(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            chunk = self.stream.read(n)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)


def _uncompressed_spans(
    reader: _BlobReader,
    sink: Callable[[bytes], None],
    span_size: int,
    file_cut_min: int,
    data_starts: deque[int] | None,
) -> tuple[list[Span], int, int]:
    """Slices of span_size bytes; with file-aware cuts also a cut exactly at each file's data
    start that lies at least file_cut_min bytes after the previous cut."""
    spans: list[Span] = []
    span_start = position = 0  # of the current span, of the next byte read
    span_hash = hashlib.sha256()

    def close(end: int) -> None:
        nonlocal span_start, span_hash
        digest = "sha256:" + span_hash.hexdigest()
        spans.append(Span(span_start, end, span_start, end, digest, digest))
        span_start, span_hash = end, hashlib.sha256()

    while True:
        data = reader.read_exact(span_size - (position - span_start))
        if not data:
            break
        sink(data)  # the parser learns the data starts in data (a header precedes its data)
        view, end = memoryview(data), position + len(data)
        while data_starts:
            cut = data_starts.popleft()
            if cut - span_start >= file_cut_min and cut <= end:
                span_hash.update(view[: cut - position])
                view, position = view[cut - position :], cut
                close(cut)
        span_hash.update(view)
        position = end
        if position - span_start == span_size:
            close(position)
    if position > span_start:
        close(position)
    return spans, position, position


def build_layer_index(
    stream: ReadableStream,
    *,
    media_type: str,
    span_size: int = DEFAULT_SPAN_SIZE,
    file_cut_min: int = DEFAULT_FILE_CUT_MIN,
    expected_digest: str | None = None,
    progress: Callable[[int], None] | None = None,
    inflate_library: InflateLibrary | None = None,
) -> LayerIndex:
    """Read the layer blob once from `stream` and describe it (TOC + verified spans).

    `file_cut_min` > 0 also cuts spans where a file's data starts, once the span holds that
    many bytes (gzip: at the deflate block boundary at or before it; uncompressed: exactly
    there; zstd: frames are never split, so it has no effect); 0 cuts by size only.
    `inflate_library` inflates a gzip layer (default: the fastest that works here; a benchmark
    pins system zlib to time the fallback). Raises InvalidLayer for anything that cannot be
    indexed safely; OSErrors of the stream itself propagate unchanged."""
    if not MIN_SPAN_SIZE <= span_size <= MAX_SPAN_SIZE:
        raise InvalidLayer(
            f"span size {span_size} is outside [{MIN_SPAN_SIZE}, {MAX_SPAN_SIZE}] bytes"
        )
    if file_cut_min < 0:
        raise InvalidLayer(f"file cut minimum {file_cut_min} is negative")
    declared = compression_for_media_type(media_type)
    reader = _BlobReader(stream, progress)
    sniffed = sniff_compression(reader.peek(4))
    if sniffed is not declared:
        raise InvalidLayer(
            f"layer media type {media_type!r} says {declared}, but its bytes look like {sniffed}"
        )
    data_starts: deque[int] | None = deque() if file_cut_min else None
    toc = TarTocParser(data_starts=data_starts)
    if declared is Compression.GZIP:
        spans, csize, usize = GzipSpanBuilder(
            reader.read_exact,
            toc.feed,
            span_size,
            inflate_library,
            file_cut_min=file_cut_min,
            data_starts=data_starts,
        ).run()
    elif declared is Compression.ZSTD:
        toc.data_starts = None  # frames are never split: nothing to cut at
        spans, csize, usize = ZstdSpanBuilder(reader.read_exact, toc.feed, span_size).run()
    else:
        spans, csize, usize = _uncompressed_spans(
            reader, toc.feed, span_size, file_cut_min, data_starts
        )
    entries = toc.finish()
    layer_digest = "sha256:" + reader.digest.hexdigest()
    if expected_digest is not None and expected_digest != layer_digest:
        raise InvalidLayer(
            f"layer digest mismatch: expected {expected_digest}, blob hashes to {layer_digest}"
        )
    for entry in entries:
        if entry.offset + entry.size > usize:
            raise InvalidLayer(f"tar entry {entry.name!r} extends past the end of the layer")
        why = name_limits_problem(entry.name, entry.link_target, entry.type is EntryType.SYMLINK)
        if why is not None:
            raise InvalidLayer(f"tar entry {entry.name[:80]!r}: {why}")
    # never produce an index that decode_index would refuse
    if len(spans) > MAX_SPANS:
        raise InvalidLayer(f"layer needs {len(spans)} spans, more than {MAX_SPANS}")
    for number, span in enumerate(spans):
        if span.uncompressed_size > MAX_SPAN_UNCOMPRESSED:
            raise InvalidLayer(
                f"layer span {number} inflates to {span.uncompressed_size} bytes (one deflate "
                f"block); more than {MAX_SPAN_UNCOMPRESSED}, not randomly accessible"
            )
    return LayerIndex(
        layer_digest=layer_digest,
        layer_media_type=media_type,
        compression=declared,
        compressed_size=csize,
        uncompressed_size=usize,
        span_size=span_size,
        entries=tuple(entries),
        spans=tuple(spans),
    )
