"""Cut a gzip layer into zran spans while streaming it once.

Two inflaters run over the same compressed bytes, in one thread:
* indexed_gzip (zlib's zran) finds deflate block boundaries every `span_size` uncompressed bytes
  and records checkpoints. It pulls compressed bytes through `_ZranSource.read`, and that callback
  is where everything else happens: it reads the caller's stream, and it polls the checkpoints
  found so far.
* zlib-ng (zlib's API, ~2.5x faster inflate) produces the uncompressed bytes (indexed_gzip cannot
  hand them out while it builds) for the tar parser and the per-span digests. It never runs past a
  point where an unknown checkpoint could still appear: zran only places one at >= last checkpoint
  + spacing, or at the start of a gzip member, which this inflater sees itself.

Python's zlib bindings have no inflatePrime or bit position, so the builder cannot learn a
checkpoint's bit offset until zran exports its index at the end; it hashes each span's compressed
bytes both with and without the shared leading byte and keeps the right digest then.

Memory: the compressed bytes between the last two checkpoints (~2 spans) plus one read buffer.
Speed: both inflaters run in one thread because indexed_gzip holds the GIL while it builds (a
worker thread measured no faster); build_full_index costs ~60% of the time, zlib-ng ~25%.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import indexed_gzip
from zlib_ng import zlib_ng as zlib  # zlib-ng: same API and format, ~2.5x faster inflate

from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import Span

# zlib_ng's stub declares `error` as an instance; it is the exception class at runtime
_ZLIB_ERROR: type[Exception] = zlib.error  # type: ignore[assignment]

WINDOW_SIZE = 32768
READ_SIZE = 1 << 20  # zran's read buffer; must hold a gzip trailer + the next member's header
_MAX_STEP = 4 << 20
MAX_BACKLOG = 64 << 20  # compressed bytes held beyond two spans before giving up
_EXPORT_HEADER = struct.Struct("<5sBBQQIII")
_EXPORT_POINT = struct.Struct("<QQBB")


def _sha256(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class _Cut:
    """State recorded when the uncompressed stream reaches a checkpoint."""

    uncompressed_digest: str  # of the span ending here
    window: bytes  # 32 KiB preceding this checkpoint


@dataclass
class _PointHeader:
    """One zran checkpoint as exported: bits and whether it carries a window."""

    bits: int
    has_window: bool


class _ExportSink(io.RawIOBase):
    """File-like sink for zran_export_index that keeps only the fixed part (no windows)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = bytearray()
        self.limit = _EXPORT_HEADER.size

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
            if len(self.head) == _EXPORT_HEADER.size and self.limit == _EXPORT_HEADER.size:
                npoints = _EXPORT_HEADER.unpack(self.head)[-1]
                self.limit += npoints * _EXPORT_POINT.size
        return len(data)


def _exported_points(zran: indexed_gzip.IndexedGzipFile) -> dict[int, _PointHeader]:
    """cmp_offset -> (bits, has window) for every checkpoint, from zran's documented format."""
    sink = _ExportSink()
    zran.export_index(fileobj=sink)
    magic, _version, _flags, _cs, _us, _spacing, _window, npoints = _EXPORT_HEADER.unpack_from(
        sink.head
    )
    if magic != b"GZIDX":
        raise RuntimeError(f"indexed_gzip exported an unknown index format {magic!r}")
    points: dict[int, _PointHeader] = {}
    for i in range(npoints):
        cmp_offset, _uncmp, bits, data_flag = _EXPORT_POINT.unpack_from(
            sink.head, _EXPORT_HEADER.size + i * _EXPORT_POINT.size
        )
        points[cmp_offset] = _PointHeader(bits, bool(data_flag))
    return points


class _ZranSource(io.RawIOBase):
    """What indexed_gzip reads from: not seekable, every read goes to the builder."""

    def __init__(self, builder: GzipSpanBuilder) -> None:
        super().__init__()
        self._builder = builder
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        data = self._builder.on_zran_read(READ_SIZE if size < 0 else size)
        self._pos += len(data)
        return data


@dataclass
class GzipSpanBuilder:
    read_exact: Callable[[int], bytes]  # caller's stream: n bytes, fewer only at the end
    sink: Callable[[bytes], None]  # receives the uncompressed stream in order
    span_size: int
    # zran checkpoints seen so far, deduplicated by uncompressed offset (the later one wins:
    # a member start right after a block boundary decodes from the member start)
    _outs: list[int] = field(default_factory=list)
    _cmps: list[int] = field(default_factory=list)
    _raw_points: list[tuple[int, int]] = field(default_factory=list)
    _zran: indexed_gzip.IndexedGzipFile | None = None
    _error: BaseException | None = None
    # compressed side
    _received: int = 0
    _cbuf: bytearray = field(default_factory=bytearray)
    _cbuf_start: int = 0
    _hashed_spans: int = 0  # spans whose compressed digests are done
    _cdigests: list[tuple[str, str]] = field(default_factory=list)  # (with lead byte, without)
    # uncompressed side
    _pending: deque[bytes] = field(default_factory=deque)
    _inflater: zlib._Decompress = field(default_factory=lambda: zlib.decompressobj(31))
    _member_done: bool = False
    _padding: bool = False  # zero bytes after the last member
    _upos: int = 0
    _uhash: hashlib._Hash = field(default_factory=hashlib.sha256)
    _tail: bytearray = field(default_factory=bytearray)
    _cuts: dict[int, _Cut] = field(default_factory=dict)

    def run(self) -> tuple[list[Span], int, int]:
        """Consume the whole stream; returns (spans, compressed size, uncompressed size)."""
        source = _ZranSource(self)
        try:
            self._zran = indexed_gzip.IndexedGzipFile(
                fileobj=source,
                spacing=self.span_size,
                window_size=WINDOW_SIZE,
                readbuf_size=READ_SIZE,
                auto_build=True,
                skip_crc_check=True,  # the Python inflater checks every member's CRC
            )
            self._zran.build_full_index()
        except Exception as exc:
            # errors raised inside our read callback arrive wrapped in ZranError
            if self._error is not None:
                raise self._error from None
            raise InvalidLayer(f"gzip layer is corrupt or truncated: {exc}") from None
        if self._error is not None:
            raise self._error
        self._poll_points()
        self._inflate(final=True)
        headers = _exported_points(self._zran)
        self._zran.close()
        return self._finish(headers)

    # -- callbacks from zran -------------------------------------------------------------------

    def on_zran_read(self, size: int) -> bytes:
        try:
            self._poll_points()
            data = self.read_exact(size)
            self._received += len(data)
            self._cbuf += data
            if data:
                self._pending.append(data)
            self._inflate(final=False)
            self._hash_compressed(final=False)
            if len(self._cbuf) > 2 * self.span_size + MAX_BACKLOG:
                # zran found no usable block boundary for this long (a crafted or exotic
                # stream): refuse rather than buffer the layer in memory
                raise InvalidLayer(
                    f"gzip layer has no deflate block boundary within {len(self._cbuf)} "
                    f"compressed bytes after offset {self._cbuf_start}; cannot be indexed"
                )
            return data
        except BaseException as exc:
            self._error = exc
            raise

    def _poll_points(self) -> None:
        assert self._zran is not None
        points = itertools.islice(self._zran.seek_points(), len(self._raw_points), None)
        for out, cmp in points:
            self._raw_points.append((out, cmp))
            if out == 0:
                continue  # span 0 always starts at the gzip header
            if out < self._upos and out not in self._cuts:
                raise RuntimeError(f"zran checkpoint at {out} is behind the inflater")
            if self._outs and self._outs[-1] == out:
                self._cmps[-1] = cmp
            else:
                self._outs.append(out)
                self._cmps.append(cmp)

    # -- uncompressed side ---------------------------------------------------------------------

    def _inflate(self, *, final: bool) -> None:
        while True:
            nxt = bisect.bisect_right(self._outs, self._upos)
            cut_at = self._outs[nxt] if nxt < len(self._outs) else None
            if self._outs and self._outs[nxt - 1] == self._upos and self._upos not in self._cuts:
                self._cut()
                continue
            if final:
                limit = cut_at
            else:
                frontier = (self._outs[-1] if self._outs else 0) + self.span_size
                limit = min(cut_at, frontier) if cut_at is not None else frontier
            if limit is not None and self._upos >= limit:
                return
            if self._member_done:
                if not self._start_next_member(final):
                    return
                continue
            data = self._inflater.unconsumed_tail or (
                self._pending.popleft() if self._pending else b""
            )
            # bounded output per call: a small hostile input must not inflate into RAM at once
            room = _MAX_STEP if limit is None else min(limit - self._upos, _MAX_STEP)
            try:
                out = self._inflater.decompress(data, room)
            except _ZLIB_ERROR as exc:
                raise InvalidLayer(f"gzip layer is corrupt at byte ~{self._upos}: {exc}") from None
            if out:
                self._emit(out)
            if self._inflater.eof:
                self._member_done = True
                rest = self._inflater.unused_data
                if rest:
                    self._pending.appendleft(rest)
            elif not out and not data:
                if final:
                    raise InvalidLayer("gzip layer is truncated (stream ends inside a member)")
                return

    def _start_next_member(self, final: bool) -> bool:
        """After a member ended: skip zero padding or start the next member. False = wait."""
        while self._pending and not self._pending[0]:
            self._pending.popleft()
        if not self._pending:
            return False
        if self._padding or self._pending[0][0] == 0:
            self._padding = True
            chunk = self._pending.popleft()
            if chunk.count(0) != len(chunk):
                raise InvalidLayer("gzip layer has non-zero bytes after zero padding")
            return True
        # zran marks every member start as a checkpoint; wait until it has (frontier rule)
        known = bool(self._outs) and self._outs[-1] >= self._upos
        if not final and self._upos not in self._cuts and not known:
            return False
        self._inflater = zlib.decompressobj(31)
        self._member_done = False
        return True

    def _emit(self, out: bytes) -> None:
        self._upos += len(out)
        self._uhash.update(out)
        if len(out) >= WINDOW_SIZE:
            self._tail = bytearray(out[-WINDOW_SIZE:])
        else:
            self._tail += out
            del self._tail[:-WINDOW_SIZE]
        self.sink(out)

    def _cut(self) -> None:
        self._cuts[self._upos] = _Cut("sha256:" + self._uhash.hexdigest(), bytes(self._tail))
        self._uhash = hashlib.sha256()

    # -- compressed side -----------------------------------------------------------------------

    def _span_bounds(self, span: int, final: bool) -> tuple[int, int] | None:
        """Compressed [start - 1 (lead byte), end) of span `span` once both ends are final."""
        start = 0 if span == 0 else self._cmps[span - 1]
        if span + 1 < len(self._cmps):  # a later checkpoint exists, so the end cannot move
            return start, self._cmps[span]
        if final:
            return start, self._received if span == len(self._cmps) else self._cmps[span]
        return None

    def _hash_compressed(self, *, final: bool) -> None:
        total = len(self._cmps) + 1 if final else len(self._cmps)
        while self._hashed_spans < total:
            bounds = self._span_bounds(self._hashed_spans, final)
            if bounds is None:
                return
            start, end = bounds
            lead = max(start - 1, 0)
            view = memoryview(self._cbuf)[lead - self._cbuf_start : end - self._cbuf_start]
            with_lead = hashlib.sha256(view).hexdigest()
            without = hashlib.sha256(view[start - lead :]).hexdigest()
            view.release()
            self._cdigests.append(("sha256:" + with_lead, "sha256:" + without))
            self._hashed_spans += 1
            keep_from = max(end - 1, 0)
            del self._cbuf[: keep_from - self._cbuf_start]
            self._cbuf_start = keep_from

    def _finish(self, headers: dict[int, _PointHeader]) -> tuple[list[Span], int, int]:
        total_out = self._upos
        # zran adds a checkpoint at the very end; spans end there implicitly
        while self._outs and self._outs[-1] >= total_out:
            self._outs.pop()
            self._cmps.pop()
        self._hashed_spans = min(self._hashed_spans, len(self._cmps))
        del self._cdigests[self._hashed_spans :]
        if self._cbuf_start > (self._cmps[self._hashed_spans - 1] - 1 if self._hashed_spans else 0):
            raise RuntimeError("compressed bytes of an unhashed span were dropped")
        self._hash_compressed(final=True)
        if total_out not in self._cuts:
            self._cut()
        spans: list[Span] = []
        starts_out = [0, *self._outs]
        starts_cmp = [0, *self._cmps]
        for i, (out_start, cmp_start) in enumerate(zip(starts_out, starts_cmp, strict=True)):
            out_end = starts_out[i + 1] if i + 1 < len(starts_out) else total_out
            cmp_end = starts_cmp[i + 1] if i + 1 < len(starts_cmp) else self._received
            header = headers.get(cmp_start) if i else None
            bits = header.bits if header else 0
            with_lead, without = self._cdigests[i]
            spans.append(
                Span(
                    compressed_start=cmp_start - (1 if bits else 0),
                    compressed_end=cmp_end,
                    uncompressed_start=out_start,
                    uncompressed_end=out_end,
                    digest=with_lead if bits else without,
                    uncompressed_digest=self._cuts[out_end].uncompressed_digest,
                    bits=bits,
                    window=self._cuts[out_start].window if header and header.has_window else b"",
                )
            )
        return spans, self._received, total_out
