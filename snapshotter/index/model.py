"""Data model of a lazysnap layer index (format versions 1 and 2; see docs/index-format.md).

One LayerIndex describes one image layer blob: every tar entry (the TOC), and the layer cut into
spans. A span is a compressed byte range that inflates on its own: for gzip it starts at a zran
checkpoint (bit offset + 32 KiB window), for zstd it is one or more whole frames. Each span
carries the sha256 of its compressed bytes and of its uncompressed bytes, so a reader verifies
everything it fetches before serving it.

Where a gzip span's window lives depends on the version: version 1 carries it inline
(Span.window), version 2 in a separate windows blob (LayerIndex.windows) at
Span.window_offset/window_length, so the index blob a mount must fetch first stays small and a
window is fetched only with its span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

FORMAT_VERSION = 1  # windows inline in the index blob
FORMAT_VERSION_EXTERNAL_WINDOWS = 2  # windows in their own blob (LayerIndex.windows)
SUPPORTED_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_EXTERNAL_WINDOWS)
# 1 MiB: measured against 4 MiB in the start-up benchmark (docs/bench-startup.md, "Span size"):
# a third fewer bytes per cold start, and with a profile 2-3x faster starts on a 100 Mbit/s
# link; costs a 3x bigger index and ~25 % of loopback cold sequential-read speed.
DEFAULT_SPAN_SIZE = 1 << 20
# File-aware cuts (docs/index-format.md "Spans"): 0 = cut by size only (zran's rule).
DEFAULT_FILE_CUT_MIN = 0
MIN_SPAN_SIZE = 64 << 10
MAX_SPAN_SIZE = 64 << 20
DEFAULT_MIN_LAYER_SIZE = 10 << 20
# Largest encoded index blob a reader fetches from a registry (it is held in memory whole).
MAX_INDEX_BLOB_SIZE = 256 << 20


class Compression(StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


class EntryType(StrEnum):
    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"  # link_target names the entry whose data and inode it shares
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True)
class TocEntry:
    """One tar entry, as written in the layer (whiteouts `.wh.*` kept verbatim)."""

    name: str  # normalised: relative, no leading "./" or "/", no trailing "/", no ".." parts
    type: EntryType
    mode: int  # permission bits incl. setuid/setgid/sticky (0o7777), no file-type bits
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    size: int = 0  # data size (REG only; 0 otherwise)
    mtime_ns: int = 0
    link_target: str = ""  # SYMLINK: target as written; HARDLINK: normalised entry name
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # from PAX SCHILY.xattr.* etc.
    offset: int = 0  # offset of the data in the uncompressed tar stream (REG only)


@dataclass(frozen=True)
class Span:
    """A compressed range [compressed_start, compressed_end) that inflates on its own into the
    uncompressed range [uncompressed_start, uncompressed_end)."""

    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int
    digest: str  # "sha256:<hex>" of blob[compressed_start:compressed_end]
    uncompressed_digest: str  # "sha256:<hex>" of the inflated bytes
    # gzip only: zran checkpoint the span starts from. bits = number of bits of the byte at
    # compressed_start that belong to this span (0 when it starts on a byte boundary).
    bits: int = 0
    window: bytes = b""  # up to 32 KiB of uncompressed data preceding the span (gzip only)
    # Version 2 instead: the window is the zstd frame windows_blob[window_offset:+window_length]
    # (length 0: the span needs no window).
    window_offset: int = 0
    window_length: int = 0

    @property
    def compressed_size(self) -> int:
        return self.compressed_end - self.compressed_start

    @property
    def uncompressed_size(self) -> int:
        return self.uncompressed_end - self.uncompressed_start


@dataclass(frozen=True)
class WindowsBlob:
    """The blob holding a version-2 index's span windows: one zstd frame per window."""

    digest: str  # "sha256:<hex>"
    size: int


@dataclass(frozen=True)
class LayerIndex:
    layer_digest: str  # "sha256:<hex>" of the compressed blob
    layer_media_type: str
    compression: Compression
    compressed_size: int
    uncompressed_size: int
    span_size: int
    entries: tuple[TocEntry, ...]
    spans: tuple[Span, ...]
    prefetch: tuple[str, ...] = ()  # entry names to fetch first, in order (startup profile)
    version: int = FORMAT_VERSION
    windows: WindowsBlob | None = None  # version 2: where the spans' windows are
