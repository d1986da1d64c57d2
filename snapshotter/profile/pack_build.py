"""Build the start-up pack (snapshotter/index/pack.py) of a recording: the bytes the command
read from each layer, read back from the recording's own lazy mounts (verified spans, mostly in
the recording's cache already), cut into chunks in first-read order and compressed one chunk at a
time into a file. Memory: a few chunks, whatever the pack's size."""

from __future__ import annotations

import bisect
import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from snapshotter.index.pack import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LEVEL,
    PackChunk,
    PackRange,
    PackSection,
    compress_chunk,
    plan_chunks,
)
from snapshotter.profile.record import MountedLayer, ProfileRecordError, ReadPiece

# Chunks compressed at once: zstd releases the GIL, so two use both cores of a small builder.
COMPRESS_THREADS = 2


@dataclass(frozen=True)
class BuiltPack:
    path: Path
    digest: str  # sha256:<hex> of the file
    size: int
    sections: dict[str, PackSection]  # by layer digest
    uncompressed_size: int
    seconds: float  # reading + compressing


def build_pack(
    layers: Sequence[MountedLayer],
    out: Path,
    *,
    level: int = DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> BuiltPack | None:
    """Write the pack of the layers' read pieces to out; None when nothing was read."""
    started = time.monotonic()
    sections: dict[str, PackSection] = {}
    digest = hashlib.sha256()
    offset = 0
    with open(out, "wb") as sink, ThreadPoolExecutor(COMPRESS_THREADS) as pool:
        for layer in layers:
            if not layer.pieces:
                continue
            reader = _PieceReader(layer)
            try:
                plan = plan_chunks(
                    [PackRange(p.start, p.end - p.start) for p in layer.pieces], chunk_bytes
                )
                chunks: list[PackChunk] = []
                pending: list[tuple[tuple[PackRange, ...], Future[bytes]]] = []
                for ranges in plan:
                    data = b"".join(reader.read(r) for r in ranges)
                    pending.append((ranges, pool.submit(compress_chunk, data, level)))
                    if len(pending) > COMPRESS_THREADS:
                        chunks.append(_write(sink, digest, *pending.pop(0)))
                for ranges, future in pending:
                    chunks.append(_write(sink, digest, ranges, future))
            finally:
                reader.close()
            section = PackSection(offset, tuple(chunks))
            sections[layer.digest] = section
            offset += section.length
    if not sections:
        out.unlink()
        return None
    return BuiltPack(
        out,
        "sha256:" + digest.hexdigest(),
        offset,
        sections,
        sum(s.uncompressed_size for s in sections.values()),
        time.monotonic() - started,
    )


def _write(
    sink: BinaryIO, digest: Any, ranges: tuple[PackRange, ...], future: Future[bytes]
) -> PackChunk:
    frame = future.result()
    sink.write(frame)
    digest.update(frame)  # the whole pack's
    return PackChunk(len(frame), hashlib.sha256(frame).hexdigest(), ranges)


class _PieceReader:
    """Tar-stream ranges of one layer, read from its lazy mount through the files they belong
    to (the pieces its mount logged; disjoint)."""

    def __init__(self, layer: MountedLayer) -> None:
        self.layer = layer
        self._pieces: list[ReadPiece] = sorted(layer.pieces, key=lambda p: p.start)
        self._starts = [p.start for p in self._pieces]
        self._fds: dict[str, int] = {}

    def read(self, wanted: PackRange) -> bytes:
        parts = []
        position = wanted.start
        i = bisect.bisect_right(self._starts, position) - 1
        while position < wanted.end:
            if i < 0 or i >= len(self._pieces) or self._pieces[i].end <= position:
                raise ProfileRecordError(
                    f"layer {self.layer.digest}: tar bytes at {position} were not read"
                )
            piece = self._pieces[i]
            stop = min(piece.end, wanted.end)
            parts.append(self._pread(piece, piece.file_offset + position - piece.start, stop))
            position = stop
            i += 1
        return b"".join(parts)

    def _pread(self, piece: ReadPiece, file_offset: int, stop: int) -> bytes:
        length = stop - (piece.start + file_offset - piece.file_offset)
        fd = self._fds.get(piece.name)
        path = self.layer.mountpoint / piece.name
        try:
            if fd is None:
                if len(self._fds) >= 64:
                    self.close()
                fd = self._fds[piece.name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, length, file_offset)
        except OSError as exc:
            raise ProfileRecordError(
                f"layer {self.layer.digest}: reading {piece.name} for the start-up pack: "
                f"{exc.strerror}"
            ) from None
        if len(data) != length:
            raise ProfileRecordError(
                f"layer {self.layer.digest}: {piece.name}: {len(data)} of {length} bytes at "
                f"{file_offset}"
            )
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
