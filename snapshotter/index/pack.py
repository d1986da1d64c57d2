"""The start-up pack: the bytes a recorded workload read, stored once, compressed hard, beside
a layer's spans. Format and verification only; no I/O (the build is profile/pack_build.py, the
serving fs/pack_store.py).

A pack blob (PACK_MEDIA_TYPE in the artifact) is the concatenation of one *section* per layer
the workload read from. A section is a run of *chunks*; each chunk is one independent zstd
frame (content size in its header) whose output is the concatenation of the chunk's *ranges*:
(start, length) in the layer's uncompressed tar stream, in the order the workload first read
them. Everything a reader needs to trust the bytes is in the signed profile blob
(profile/model.py, version 2): the pack's digest and size, and per layer the section's offset
and per chunk its compressed size, the sha256 of its compressed bytes and its ranges. So a
mount checks each chunk's digest BEFORE it is decompressed (hostile bytes never reach zstd),
decompresses into at most the declared size, and can serve a chunk as soon as it verified.

Why independent frames rather than one long-window stream: a chunk can be verified, inflated
and served alone, and a decompressor never needs more memory than one chunk
(docs/startup-profile.md has the measured cost in size).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

PACK_FORMAT = 1
DEFAULT_CHUNK_BYTES = 4 << 20  # uncompressed bytes per chunk (a frame), before its last range
MAX_CHUNK_BYTES = 64 << 20  # uncompressed: what one chunk may declare (bounds memory)
MAX_CHUNKS = 1 << 16
MAX_RANGES = 1 << 20  # per section
DEFAULT_LEVEL = 19
_HEX64 = re.compile(r"^[a-f0-9]{64}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


class PackError(ValueError):
    """A pack description or chunk that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PackRange:
    """length bytes of the layer's uncompressed tar stream from start."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class PackChunk:
    compressed_size: int
    sha256: str  # hex of the compressed bytes
    ranges: tuple[PackRange, ...]

    @property
    def uncompressed_size(self) -> int:
        return sum(r.length for r in self.ranges)


@dataclass(frozen=True)
class PackSection:
    """One layer's part of a pack blob: bytes [offset, offset + length) of it."""

    offset: int
    chunks: tuple[PackChunk, ...]

    @property
    def length(self) -> int:
        return sum(c.compressed_size for c in self.chunks)

    @property
    def uncompressed_size(self) -> int:
        return sum(c.uncompressed_size for c in self.chunks)

    def ranges(self) -> Iterator[PackRange]:
        for chunk in self.chunks:
            yield from chunk.ranges

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "chunks": [
                {
                    "size": c.compressed_size,
                    "sha256": c.sha256,
                    "ranges": [[r.start, r.length] for r in c.ranges],
                }
                for c in self.chunks
            ],
        }


@dataclass(frozen=True)
class LayerPack:
    """What a layer's mount needs to fetch and check its section: the pack blob and the
    section (all from the signed profile)."""

    pack_digest: str
    pack_size: int
    section: PackSection

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.pack_digest,
            "size": self.pack_size,
            "section": self.section.to_json(),
        }


def layer_pack_from_json(obj: Any, where: str = "pack") -> LayerPack:
    if not isinstance(obj, dict) or set(obj) != {"digest", "size", "section"}:
        raise PackError(f"{where}: expected an object with digest, size and section")
    digest, size = obj["digest"], obj["size"]
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise PackError(f"{where}.digest: {digest!r} is not a sha256 digest")
    if not _is_int(size) or size <= 0:
        raise PackError(f"{where}.size: {size!r} is not a positive integer")
    section = section_from_json(obj["section"], size, f"{where}.section")
    return LayerPack(digest, size, section)


def section_from_json(obj: Any, pack_size: int, where: str = "section") -> PackSection:
    """A section as the profile stores it, checked: sizes positive and bounded, digests well
    formed, ranges non-empty and not overlapping each other, the section inside the pack."""
    if not isinstance(obj, dict) or set(obj) != {"offset", "chunks"}:
        raise PackError(f"{where}: expected an object with offset and chunks")
    offset, raw_chunks = obj["offset"], obj["chunks"]
    if not _is_int(offset) or offset < 0:
        raise PackError(f"{where}.offset: {offset!r} is not an integer >= 0")
    if not isinstance(raw_chunks, list) or not raw_chunks:
        raise PackError(f"{where}.chunks: not a non-empty list")
    if len(raw_chunks) > MAX_CHUNKS:
        raise PackError(f"{where}.chunks: {len(raw_chunks)} chunks, more than {MAX_CHUNKS}")
    chunks = []
    range_count = 0
    for number, raw in enumerate(raw_chunks):
        here = f"{where}.chunks[{number}]"
        if not isinstance(raw, dict) or set(raw) != {"size", "sha256", "ranges"}:
            raise PackError(f"{here}: expected an object with size, sha256 and ranges")
        size, sha, raw_ranges = raw["size"], raw["sha256"], raw["ranges"]
        if not _is_int(size) or size <= 0:
            raise PackError(f"{here}.size: {size!r} is not a positive integer")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise PackError(f"{here}.sha256: {sha!r} is not 64 lowercase hex digits")
        if not isinstance(raw_ranges, list) or not raw_ranges:
            raise PackError(f"{here}.ranges: not a non-empty list")
        range_count += len(raw_ranges)
        if range_count > MAX_RANGES:
            raise PackError(f"{where}: more than {MAX_RANGES} ranges")
        ranges = []
        for i, item in enumerate(raw_ranges):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(_is_int(v) for v in item)
                or item[0] < 0
                or item[1] <= 0
            ):
                raise PackError(f"{here}.ranges[{i}]: {item!r} is not [start >= 0, length > 0]")
            ranges.append(PackRange(item[0], item[1]))
        chunk = PackChunk(size, sha, tuple(ranges))
        if chunk.uncompressed_size > MAX_CHUNK_BYTES:
            raise PackError(
                f"{here}: {chunk.uncompressed_size} uncompressed bytes, more than {MAX_CHUNK_BYTES}"
            )
        chunks.append(chunk)
    section = PackSection(offset, tuple(chunks))
    if section.offset + section.length > pack_size:
        raise PackError(
            f"{where}: bytes {section.offset}..{section.offset + section.length} lie outside "
            f"the pack ({pack_size} bytes)"
        )
    check_ranges_disjoint(section.ranges(), where)
    return section


def check_ranges_disjoint(ranges: Iterable[PackRange], where: str) -> None:
    ordered = sorted(ranges, key=lambda r: r.start)
    for before, after in itertools.pairwise(ordered):
        if after.start < before.end:
            raise PackError(
                f"{where}: ranges [{before.start}, {before.end}) and [{after.start}, "
                f"{after.end}) overlap"
            )


def check_section_fits(section: PackSection, layer_size: int, where: str) -> None:
    """Every range inside the layer's uncompressed tar stream (known from its index)."""
    for r in section.ranges():
        if r.end > layer_size:
            raise PackError(
                f"{where}: range [{r.start}, {r.end}) ends after the layer's {layer_size} "
                "uncompressed bytes"
            )


def open_chunk(chunk: PackChunk, data: bytes, where: str) -> bytes:
    """The uncompressed bytes of a chunk from its compressed bytes, verified: the size and
    sha256 are checked before zstd sees a byte, and the output is bounded by (and must equal)
    the declared size."""
    if len(data) != chunk.compressed_size:
        raise PackError(f"{where}: {len(data)} bytes, the profile says {chunk.compressed_size}")
    got = hashlib.sha256(data).hexdigest()
    if got != chunk.sha256:
        raise PackError(f"{where}: sha256 {got} is not the profile's {chunk.sha256}")
    expected = chunk.uncompressed_size
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise PackError(f"{where}: not a zstd frame: {exc}") from None
    if declared != expected:
        raise PackError(f"{where}: the frame declares {declared} bytes, the ranges {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise PackError(f"{where}: {exc}") from None
    if len(out) != expected:
        raise PackError(f"{where}: inflated to {len(out)} bytes, expected {expected}")
    return out


def compress_chunk(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """One chunk's frame (content size written, so a reader bounds the output)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), write_content_size=True, write_checksum=False
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def plan_chunks(
    ranges: Sequence[PackRange], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[tuple[PackRange, ...]]:
    """Cut an ordered list of ranges into chunks of chunk_bytes uncompressed bytes (the last
    one smaller); a range crossing a chunk boundary is split. Adjacent ranges are merged."""
    if chunk_bytes <= 0 or chunk_bytes > MAX_CHUNK_BYTES:
        raise PackError(f"chunk size {chunk_bytes} is not within 1..{MAX_CHUNK_BYTES}")
    chunks: list[tuple[PackRange, ...]] = []
    current: list[PackRange] = []
    room = chunk_bytes
    for r in ranges:
        start, length = r.start, r.length
        while length > 0:
            take = min(length, room)
            if current and current[-1].end == start:
                current[-1] = PackRange(current[-1].start, current[-1].length + take)
            else:
                current.append(PackRange(start, take))
            start, length, room = start + take, length - take, room - take
            if room == 0:
                chunks.append(tuple(current))
                current, room = [], chunk_bytes
    if current:
        chunks.append(tuple(current))
    return chunks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
