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
    _frame_c: hashlib._Hash = field(default_factory=hashlib.sha256)
    _frame_u: hashlib._Hash = field(default_factory=hashlib.sha256)
    _dctx: zstandard.ZstdDecompressor = field(default_factory=zstandard.ZstdDecompressor)

    def run(self) -> tuple[list[Span], int, int]:
        while True:
            magic_bytes = self.read_exact(4)
            if not magic_bytes:
                break
            frame_cstart, frame_ustart = self._cpos, self._upos
            before_c, before_u = self._current.chash.copy(), self._current.uhash.copy()
            self._frame_c, self._frame_u = hashlib.sha256(), hashlib.sha256()
            self._take(magic_bytes, "frame magic")
            magic = int.from_bytes(magic_bytes, "little")
            if is_skippable(magic):
                size = int.from_bytes(self._need(4, "skippable frame size"), "little")
                while size:
                    size -= len(self._need(min(size, 1 << 20), "skippable frame"))
            elif magic == ZSTD_MAGIC:
                self._frame(frame_cstart)
            else:
                raise InvalidLayer(
                    f"zstd layer: bytes at offset {frame_cstart} are not a zstd frame "
                    f"(magic {magic:#010x})"
                )
            frame_size = self._upos - frame_ustart
            grown = frame_ustart - self._current.uncompressed_start
            if grown and grown + frame_size > self.span_size:
                # this frame starts a new span: close the previous one without it
                self._close_span(frame_cstart, frame_ustart, before_c, before_u)
                self._current = _SpanAccumulator(
                    frame_cstart, frame_ustart, self._frame_c, self._frame_u
                )
        if self._cpos == 0:
            raise InvalidLayer("zstd layer is empty")
        # frames without output (skippable, empty) never start a span, so this one is not empty
        self._close_span(self._cpos, self._upos, self._current.chash, self._current.uhash)
        return self.spans, self._cpos, self._upos

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

    def _take(self, data: bytes, _what: str) -> bytes:
        self._cpos += len(data)
        self._current.chash.update(data)
        self._frame_c.update(data)
        return data

    def _need(self, n: int, what: str) -> bytes:
        data = self.read_exact(n)
        if len(data) != n:
            raise InvalidLayer(f"zstd layer is truncated inside a {what} at offset {self._cpos}")
        return self._take(data, what)

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
        self._frame_u.update(data)
        self.sink(data)

    def _frame(self, frame_start: int) -> None:
        header = self._need(1, "frame header")
        descriptor = header[0]
        if descriptor & 0x08:
            raise InvalidLayer(f"zstd layer: frame at offset {frame_start} sets a reserved bit")
        single_segment = descriptor >> 5 & 1
        fcs_size = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
        dict_size = _DICT_ID_SIZES[descriptor & 3]
        rest = self._need((0 if single_segment else 1) + dict_size + fcs_size, "frame header")
        dict_id = rest[1 - single_segment : 1 - single_segment + dict_size]
        if dict_id and int.from_bytes(dict_id, "little"):
            raise InvalidLayer(f"zstd layer: frame at offset {frame_start} needs a dictionary")
        if fcs_size:
            content_size = int.from_bytes(rest[-fcs_size:], "little") + (
                256 if fcs_size == 2 else 0
            )
            if content_size > MAX_SPAN:
                raise InvalidLayer(
                    f"zstd layer: single zstd frame of {content_size} bytes at offset "
                    f"{frame_start}; not randomly accessible"
                )
        inflater = self._dctx.decompressobj()
        frame_out = 0
        try:
            inflater.decompress(ZSTD_MAGIC.to_bytes(4, "little") + header + rest)
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
