"""Cut a zstd layer into spans of whole frames while streaming it once.

Frame and block headers are parsed here (the format is simple and zstandard's Python API does
not report frame boundaries while streaming); each block is inflated on its own, so one call
never yields more than 128 KiB however hostile the input. Frames are grouped into spans of up to
`span_size` uncompressed bytes; a frame is never split, so one frame larger than MAX_SPAN makes
the layer unindexable (it would be pulled whole).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import Span

ZSTD_MAGIC = 0xFD2FB528
MAX_SPAN = 64 << 20
_BLOCK_MAX = 128 << 10
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)


def is_skippable(magic: int) -> bool:
    return magic & 0xFFFFFFF0 == 0x184D2A50


@dataclass
class _SpanAccumulator:
    """Digests of a span being grown frame by frame."""

    compressed_start: int = 0
    uncompressed_start: int = 0
    chash: hashlib._Hash = field(default_factory=hashlib.sha256)
    uhash: hashlib._Hash = field(default_factory=hashlib.sha256)


@dataclass
class ZstdSpanBuilder:
    read_exact: Callable[[int], bytes]
    sink: Callable[[bytes], None]
    span_size: int
    spans: list[Span] = field(default_factory=list)
    _cpos: int = 0
    _upos: int = 0
    _current: _SpanAccumulator = field(default_factory=_SpanAccumulator)
    _frame_c: hashlib._Hash | None = None  # the frame alone, while its grouping is undecided
    _frame_u: hashlib._Hash | None = None
    _dctx: zstandard.ZstdDecompressor = field(default_factory=zstandard.ZstdDecompressor)

    def run(self) -> tuple[list[Span], int, int]:
        while True:
            magic_bytes = self.read_exact(4)
            if not magic_bytes:
                break
            frame_cstart, frame_ustart = self._cpos, self._upos
            self._cpos += len(magic_bytes)
            if len(magic_bytes) < 4:
                raise InvalidLayer(f"zstd layer is truncated inside a frame at offset {self._cpos}")
            magic = int.from_bytes(magic_bytes, "little")
            declared: int | None
            if is_skippable(magic):
                head, declared = magic_bytes + self._read(4, "skippable frame size"), 0
            elif magic == ZSTD_MAGIC:
                head, declared = self._frame_header(magic_bytes, frame_cstart)
            else:
                raise InvalidLayer(
                    f"zstd layer: bytes at offset {frame_cstart} are not a zstd frame "
                    f"(magic {magic:#010x})"
                )
            grown = frame_ustart - self._current.uncompressed_start
            # Grouping needs the frame's size: when the header declares it, decide now; else
            # hash the frame both into the span and on its own and decide at its end.
            before: tuple[hashlib._Hash, hashlib._Hash] | None = None
            if declared is None:
                before = (self._current.chash.copy(), self._current.uhash.copy())
                self._frame_c, self._frame_u = hashlib.sha256(), hashlib.sha256()
            else:
                self._frame_c = self._frame_u = None
                if grown and grown + declared > self.span_size:
                    self._start_span(frame_cstart, frame_ustart)
            self._take(head)
            if is_skippable(magic):
                size = int.from_bytes(head[4:], "little")
                while size:
                    size -= len(self._need(min(size, 1 << 20), "skippable frame"))
            else:
                self._frame_body(head, frame_cstart)
            frame_size = self._upos - frame_ustart
            if before is not None and grown and grown + frame_size > self.span_size:
                assert self._frame_c is not None and self._frame_u is not None
                self._close_span(frame_cstart, frame_ustart, *before)
                self._current = _SpanAccumulator(
                    frame_cstart, frame_ustart, self._frame_c, self._frame_u
                )
        if self._cpos == 0:
            raise InvalidLayer("zstd layer is empty")
        # frames without output (skippable, empty) never start a span, so this one is not empty
        self._close_span(self._cpos, self._upos, self._current.chash, self._current.uhash)
        return self.spans, self._cpos, self._upos

    def _start_span(self, cstart: int, ustart: int) -> None:
        self._close_span(cstart, ustart, self._current.chash, self._current.uhash)
        self._current = _SpanAccumulator(cstart, ustart)

    def _close_span(self, cend: int, uend: int, chash: hashlib._Hash, uhash: hashlib._Hash) -> None:
        self.spans.append(
            Span(
                compressed_start=self._current.compressed_start,
                compressed_end=cend,
                uncompressed_start=self._current.uncompressed_start,
                uncompressed_end=uend,
                digest="sha256:" + chash.hexdigest(),
                uncompressed_digest="sha256:" + uhash.hexdigest(),
            )
        )

    def _read(self, n: int, what: str) -> bytes:
        """Read without hashing yet (frame headers, before the grouping decision)."""
        data = self.read_exact(n)
        if len(data) != n:
            raise InvalidLayer(f"zstd layer is truncated inside a {what} at offset {self._cpos}")
        self._cpos += n
        return data

    def _take(self, data: bytes) -> bytes:
        self._current.chash.update(data)
        if self._frame_c is not None:
            self._frame_c.update(data)
        return data

    def _need(self, n: int, what: str) -> bytes:
        return self._take(self._read(n, what))

    def _output(self, data: bytes, frame_start: int, frame_out: int) -> None:
        if not data:
            return
        self._upos += len(data)
        if frame_out + len(data) > MAX_SPAN:
            raise InvalidLayer(
                f"zstd layer: single zstd frame at offset {frame_start} of more than "
                f"{MAX_SPAN} bytes; not randomly accessible"
            )
        self._current.uhash.update(data)
        if self._frame_u is not None:
            self._frame_u.update(data)
        self.sink(data)

    def _frame_header(self, magic: bytes, frame_start: int) -> tuple[bytes, int | None]:
        """Read a frame header; returns its bytes and the declared content size (or None)."""
        descriptor = self._read(1, "frame header")[0]
        if descriptor & 0x08:
            raise InvalidLayer(f"zstd layer: frame at offset {frame_start} sets a reserved bit")
        single_segment = descriptor >> 5 & 1
        fcs_size = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
        dict_size = _DICT_ID_SIZES[descriptor & 3]
        rest = self._read((0 if single_segment else 1) + dict_size + fcs_size, "frame header")
        dict_id = rest[1 - single_segment : 1 - single_segment + dict_size]
        if dict_id and int.from_bytes(dict_id, "little"):
            raise InvalidLayer(f"zstd layer: frame at offset {frame_start} needs a dictionary")
        content_size = None
        if fcs_size:
            content_size = int.from_bytes(rest[-fcs_size:], "little") + (
                256 if fcs_size == 2 else 0
            )
            if content_size > MAX_SPAN:
                raise InvalidLayer(
                    f"zstd layer: single zstd frame of {content_size} bytes at offset "
                    f"{frame_start}; not randomly accessible"
                )
        return magic + bytes([descriptor]) + rest, content_size

    def _frame_body(self, head: bytes, frame_start: int) -> None:
        """Blocks (+ checksum) of a frame whose header was just taken; libzstd checks them
        and the declared content size."""
        inflater = self._dctx.decompressobj()
        frame_out = 0
        descriptor = head[4]
        try:
            inflater.decompress(head)
            while True:
                block_header = self._need(3, "block header")
                value = int.from_bytes(block_header, "little")
                last, block_type, size = value & 1, value >> 1 & 3, value >> 3
                if block_type == 3 or size > _BLOCK_MAX:
                    raise InvalidLayer(
                        f"zstd layer: invalid block at offset {self._cpos - 3} "
                        f"(type {block_type}, size {size})"
                    )
                body = self._need(1 if block_type == 1 else size, "block")
                out = inflater.decompress(block_header + body)
                self._output(out, frame_start, frame_out)
                frame_out += len(out)
                if last:
                    break
            if descriptor & 0x04:
                out = inflater.decompress(self._need(4, "frame checksum"))
                self._output(out, frame_start, frame_out)
        except zstandard.ZstdError as exc:
            raise InvalidLayer(
                f"zstd layer: frame at offset {frame_start} is corrupt: {exc}"
            ) from None
