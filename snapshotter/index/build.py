"""Build a LayerIndex from a layer blob read once from a non-seekable stream.

The caller hands in an HTTP response body (or any object with read(n)); nothing is written to
disk and nothing is read twice. Compression is taken from the media type and checked against the
blob's magic bytes, so a mislabelled layer is refused instead of mis-indexed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.index.block_inflate import InflateLibrary
from snapshotter.index.codec import MAX_SPAN_UNCOMPRESSED, MAX_SPANS, name_limits_problem
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.gzip_spans import GzipSpanBuilder
from snapshotter.index.model import (
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
    reader: _BlobReader, sink: Callable[[bytes], None], span_size: int
) -> tuple[list[Span], int, int]:
    spans: list[Span] = []
    position = 0
    while True:
        data = reader.read_exact(span_size)
        if not data:
            break
        sink(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        end = position + len(data)
        spans.append(Span(position, end, position, end, digest, digest))
        position = end
    return spans, position, position


def build_layer_index(
    stream: ReadableStream,
    *,
    media_type: str,
    span_size: int = DEFAULT_SPAN_SIZE,
    expected_digest: str | None = None,
    progress: Callable[[int], None] | None = None,
    inflate_library: InflateLibrary | None = None,
) -> LayerIndex:
    """Read the layer blob once from `stream` and describe it (TOC + verified spans).

    `inflate_library` inflates a gzip layer (default: the fastest that works here; a benchmark
    pins system zlib to time the fallback). Raises InvalidLayer for anything that cannot be
    indexed safely; OSErrors of the stream itself propagate unchanged."""
    if not MIN_SPAN_SIZE <= span_size <= MAX_SPAN_SIZE:
        raise InvalidLayer(
            f"span size {span_size} is outside [{MIN_SPAN_SIZE}, {MAX_SPAN_SIZE}] bytes"
        )
    declared = compression_for_media_type(media_type)
    reader = _BlobReader(stream, progress)
    sniffed = sniff_compression(reader.peek(4))
    if sniffed is not declared:
        raise InvalidLayer(
            f"layer media type {media_type!r} says {declared}, but its bytes look like {sniffed}"
        )
    toc = TarTocParser()
    if declared is Compression.GZIP:
        spans, csize, usize = GzipSpanBuilder(
            reader.read_exact, toc.feed, span_size, inflate_library
        ).run()
    elif declared is Compression.ZSTD:
        spans, csize, usize = ZstdSpanBuilder(reader.read_exact, toc.feed, span_size).run()
    else:
        spans, csize, usize = _uncompressed_spans(reader, toc.feed, span_size)
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
