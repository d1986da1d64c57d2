"""Cut a gzip layer into zran spans while streaming it once, with one inflate pass.

One C inflater (block_inflate: zlib-ng, else zlib, through ctypes) produces the uncompressed
stream for the tar parser and the span digests, and finds the checkpoints itself, by zran's rule
(indexed_gzip's zran.c, so indexes match the ones it would cut):
* a checkpoint at the first deflate block boundary at least `span_size` uncompressed bytes after
  the previous checkpoint (not after a member's last block: the trailer follows there);
* a checkpoint at the start of every gzip member after the first (just after its header), with no
  window; it replaces a checkpoint at the same uncompressed offset (empty blocks/members between).
A checkpoint at uncompressed offset 0 or at the very end is dropped: span 0 starts at the first
gzip header, and the last span ends with the blob.

File-aware cuts (file_cut_min > 0) add a checkpoint at the last block boundary at or before each
regular file's data start, once the span holds file_cut_min bytes (the size rule then counts from
it), so a small file's read fetches its own block(s), not a whole span. The tar parser learns a
data start only after inflating the header before it, so this mode stops at every block boundary
and holds the block's bytes (compressed and inflated, up to BLOCK_BUFFER_CAP) until it ends: then
it is known whether a file's data starts in the block, the span is cut at the block's start if
so (its window: the 32 KiB of output before that start, still the tail then), and the block is
hashed into the span it belongs to.

To find a boundary without stopping at every block (a ctypes call each), the inflater runs freely
until one byte short of the next target, then in Z_BLOCK steps. The byte of slack matters: with
its output full, inflate may already decode past a block that ends exactly at the target.

Compressed digests are hashed as inflate consumes the bytes, so nothing is buffered. A span's end
is only certain once output follows its closing checkpoint (a member start could still replace
it), so while one is pending the bytes go both to the span it closes and to the next one.

Memory: one read buffer, one output chunk and a 32 KiB window, whatever the layer. A span that
inflates past the format's cap (one endless block) is refused as soon as it passes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from snapshotter.index.block_inflate import (
    BlockInflater,
    InflateError,
    InflateLibrary,
    load_inflate_library,
)
from snapshotter.index.codec import MAX_SPAN_UNCOMPRESSED
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import Span

WINDOW_SIZE = 32768
READ_SIZE = 1 << 20
OUTPUT_CHUNK = 1 << 20
# File-aware cuts hold one deflate block's bytes until it is known whether a file's data starts
# in it; a block that inflates to more (rare: long runs of one byte) is no cut candidate.
BLOCK_BUFFER_CAP = 4 << 20


def _sha256(hasher: hashlib._Hash) -> str:
    return "sha256:" + hasher.hexdigest()


@dataclass
class _Checkpoint:
    """Where a span starts, and what is known about the span that ends there."""

    compressed: int  # first whole byte after the boundary (zran's cmp_offset)
    uncompressed: int
    bits: int  # bits of byte compressed-1 that belong to the span starting here
    window: bytes  # the 32 KiB of output before it; b"" at a member start
    digest_before: str = ""  # uncompressed digest of the span ending here
    shared: bytes = b""  # file-aware candidates: byte compressed-1 (the shared one if bits)

    @property
    def lead(self) -> int:
        """First compressed byte of the span starting here."""
        return self.compressed - (1 if self.bits else 0)


@dataclass
class GzipSpanBuilder:
    read_exact: Callable[[int], bytes]  # caller's stream: n bytes, fewer only at the end
    sink: Callable[[memoryview], None]  # uncompressed stream in order (view valid during call)
    span_size: int
    library: InflateLibrary | None = None  # default: the fastest that works here
    # > 0: also cut at the last block boundary at or before each file's data start (from
    # data_starts, which the tar parser fills), once the span holds at least this many bytes
    file_cut_min: int = 0
    data_starts: deque[int] | None = None
    _inflater: BlockInflater | None = None
    _spans: list[Span] = field(default_factory=list)
    _start: _Checkpoint = field(default_factory=lambda: _Checkpoint(0, 0, 0, b""))
    _pending: _Checkpoint | None = None  # closes the current span unless a member start wins
    _span_chash: hashlib._Hash = field(default_factory=hashlib.sha256)  # from _start.lead
    _pending_chash: hashlib._Hash | None = None  # span ending at _pending, frozen there
    _next_chash: hashlib._Hash | None = None  # span starting at _pending
    _received: int = 0
    _ctail: bytes = b""  # the last compressed byte consumed
    _upos: int = 0
    _uhash: hashlib._Hash = field(default_factory=hashlib.sha256)
    _tail: bytes = b""  # last WINDOW_SIZE bytes of output (of hashed output, while deferring)
    # file-aware cuts: the current block's bytes are hashed when it ends, once it is known
    # whether the span is cut at its start (_block)
    _deferring: bool = False
    _block: _Checkpoint | None = None
    _block_in: bytearray = field(default_factory=bytearray)
    _block_out: bytearray = field(default_factory=bytearray)

    def run(self) -> tuple[list[Span], int, int]:
        """Consume the whole stream; returns (spans, compressed size, uncompressed size)."""
        self._inflater = BlockInflater(self.library or load_inflate_library(), OUTPUT_CHUNK)
        inflate_member = self._inflate_member
        if self.file_cut_min > 0 and self.data_starts is not None:
            inflate_member = self._inflate_member_by_block
        try:
            inflate_member()
            while self._next_member():
                inflate_member()
            return self._finish()
        except InflateError as exc:
            raise InvalidLayer(f"gzip layer is corrupt at byte ~{self._upos}: {exc}") from None
        finally:
            self._inflater.close()

    # -- input ---------------------------------------------------------------------------------

    def _read_more(self) -> bool:
        assert self._inflater is not None
        data = self.read_exact(READ_SIZE)
        if not data:
            return False
        self._received += len(data)
        self._inflater.feed(data)
        return True

    def _hash_consumed(self, data: memoryview) -> None:
        if not data:
            return
        self._ctail = data[-1:].tobytes()
        if self._deferring:
            self._block_in += data
            return
        self._span_chash.update(data)
        if self._next_chash is not None:
            self._next_chash.update(data)

    # -- members -------------------------------------------------------------------------------

    def _inflate_member(self) -> None:
        """Inflate up to the end of the current member, placing checkpoints."""
        inflater = self._inflater
        assert inflater is not None
        while True:
            if not inflater.pending_input and not self._read_more():
                raise InvalidLayer("gzip layer is truncated (stream ends inside a member)")
            target = self._last_checkpoint() + self.span_size
            seeking = self._upos >= target - 1
            room = OUTPUT_CHUNK if seeking else target - 1 - self._upos
            rest = inflater.unused_input()
            out, ended = inflater.inflate(room, stop_at_block=seeking)
            self._hash_consumed(rest[: len(rest) - inflater.pending_input])
            if out:
                self._emit(out)
                self._check_span_cap()
            if ended:
                return
            if seeking and self._upos >= target and inflater.at_block_boundary:
                compressed, bits = self._boundary()
                self._add_checkpoint(compressed, bits, member_start=False)

    def _inflate_member_by_block(self) -> None:
        """_inflate_member with file-aware cuts: stops at every block boundary; a block's bytes
        are hashed when it ends, into the span it belongs to once that is known."""
        inflater = self._inflater
        assert inflater is not None
        self._deferring, self._block = True, None  # a member start is a checkpoint already
        while True:
            if not inflater.pending_input and not self._read_more():
                raise InvalidLayer("gzip layer is truncated (stream ends inside a member)")
            rest = inflater.unused_input()
            out, ended = inflater.inflate(OUTPUT_CHUNK, stop_at_block=True)
            self._hash_consumed(rest[: len(rest) - inflater.pending_input])
            if out:
                self._emit(out)
                self._check_span_cap()
                if len(self._block_out) > BLOCK_BUFFER_CAP:
                    self._block = None  # too long to hold: no cut at its start
                    self._hash_block()
            if ended:
                self._end_block()
                self._deferring = False
                return
            if inflater.at_block_boundary:
                compressed, bits = self._boundary()
                self._end_block()
                if self._upos - self._last_checkpoint() >= self.span_size:
                    self._add_checkpoint(compressed, bits, member_start=False)
                self._block = _Checkpoint(compressed, self._upos, bits, b"", shared=self._ctail)

    def _boundary(self) -> tuple[int, int]:
        assert self._inflater is not None
        compressed, bits = self._inflater.boundary_offset()
        if compressed != self._inflater.consumed:
            # the closing span's digest already holds the bytes past the boundary
            raise RuntimeError(f"inflate read ahead of a block boundary at {compressed}")
        return compressed, bits

    def _check_span_cap(self) -> None:
        if self._upos - self._start.uncompressed > MAX_SPAN_UNCOMPRESSED:
            # no usable block boundary for this long: refuse now rather than inflate the rest
            # of a (possibly crafted, endless) block for nothing
            raise InvalidLayer(
                f"layer span {len(self._spans)} inflates to more than "
                f"{MAX_SPAN_UNCOMPRESSED} bytes (one deflate block from compressed byte "
                f"{self._start.lead}); not randomly accessible"
            )

    def _end_block(self) -> None:
        """The block that began at self._block ended here: cut the span at its start if a
        file's data starts in it and the span is long enough; then hash its bytes."""
        start, starts = self._block, self.data_starts
        assert starts is not None
        cut = False
        while starts and starts[0] < self._upos:
            data_start = starts.popleft()
            cut = cut or (start is not None and data_start >= start.uncompressed)
        if (
            cut
            and start is not None
            and self._pending is None
            and len(self._block_in) <= BLOCK_BUFFER_CAP
            and start.uncompressed - self._start.uncompressed >= self.file_cut_min
        ):
            uncompressed_digest = _sha256(self._uhash)
            self._close_span(start, _sha256(self._span_chash), uncompressed_digest)
            self._start = dataclasses.replace(start, window=self._tail)
            self._span_chash, self._uhash = hashlib.sha256(), hashlib.sha256()
            if start.bits:
                self._span_chash.update(start.shared)
        self._hash_block()

    def _hash_block(self) -> None:
        block_in, block_out = self._block_in, self._block_out
        self._span_chash.update(block_in)
        if self._next_chash is not None:
            self._next_chash.update(block_in)
        self._uhash.update(block_out)
        if len(block_out) >= WINDOW_SIZE:
            self._tail = bytes(block_out[-WINDOW_SIZE:])
        elif block_out:
            self._tail = (self._tail + block_out)[-WINDOW_SIZE:]
        block_in.clear()
        block_out.clear()

    def _next_member(self) -> bool:
        """After a member: skip zero padding to the end, or parse the next member's header and
        place its checkpoint. False at the end of the stream."""
        inflater = self._inflater
        assert inflater is not None
        padding = False
        while True:
            if not inflater.pending_input and not self._read_more():
                return False
            rest = inflater.unused_input()
            if padding or rest[0] == 0:
                padding = True
                if rest.tobytes().count(0) != len(rest):
                    raise InvalidLayer("gzip layer has non-zero bytes after zero padding")
                self._hash_consumed(rest)
                inflater.skip_input(len(rest))
                continue
            break
        inflater.reset()
        while True:  # the header: Z_BLOCK stops right after it
            rest = inflater.unused_input()
            out, ended = inflater.inflate(OUTPUT_CHUNK, stop_at_block=True)
            self._hash_consumed(rest[: len(rest) - inflater.pending_input])
            if out or ended:
                raise RuntimeError("inflate produced output before the end of a gzip header")
            if inflater.at_block_boundary:
                break
            if not inflater.pending_input and not self._read_more():
                raise InvalidLayer("gzip layer is truncated (stream ends inside a member header)")
        self._add_checkpoint(inflater.consumed, 0, member_start=True)
        return True

    # -- checkpoints ---------------------------------------------------------------------------

    def _last_checkpoint(self) -> int:
        return (self._pending or self._start).uncompressed

    def _add_checkpoint(self, compressed: int, bits: int, *, member_start: bool) -> None:
        pending = self._pending
        if pending is not None and pending.uncompressed == self._upos:
            # same output offset: the later checkpoint wins (nothing was inflated between)
            pending.compressed, pending.bits = compressed, bits
            pending.window = b"" if member_start else pending.window
        elif self._upos == 0:
            return  # span 0 starts at the first gzip header
        else:
            self._seal_pending()
            window = b"" if member_start else self._tail
            pending = _Checkpoint(compressed, self._upos, bits, window, _sha256(self._uhash))
            self._uhash = hashlib.sha256()
            self._pending = pending
        self._pending_chash = self._span_chash.copy()
        self._next_chash = hashlib.sha256()
        if bits:  # the shared byte: consumed already, so hashed into the closing span too
            self._next_chash.update(self._ctail[-1:])

    def _seal_pending(self) -> None:
        """The pending checkpoint is final: close the span before it."""
        pending = self._pending
        if pending is None:
            return
        assert self._pending_chash is not None and self._next_chash is not None
        self._close_span(pending, _sha256(self._pending_chash), pending.digest_before)
        self._start = pending
        self._span_chash = self._next_chash
        self._pending = self._pending_chash = self._next_chash = None

    def _close_span(self, end: _Checkpoint, digest: str, uncompressed_digest: str) -> None:
        start = self._start
        self._spans.append(
            Span(
                compressed_start=start.lead,
                compressed_end=end.compressed,
                uncompressed_start=start.uncompressed,
                uncompressed_end=end.uncompressed,
                digest=digest,
                uncompressed_digest=uncompressed_digest,
                bits=start.bits,
                window=start.window,
            )
        )

    # -- output --------------------------------------------------------------------------------

    def _emit(self, out: memoryview) -> None:
        self._seal_pending()  # output after it: no member start can replace it any more
        self._upos += len(out)
        if self._deferring:
            self._block_out += out
            self.sink(out)
            return
        self._uhash.update(out)
        if len(out) >= WINDOW_SIZE:
            self._tail = out[-WINDOW_SIZE:].tobytes()
        else:
            self._tail = (self._tail + out)[-WINDOW_SIZE:]
        self.sink(out)

    def _finish(self) -> tuple[list[Span], int, int]:
        total_out = self._upos
        pending = self._pending
        if pending is not None:
            # a checkpoint at the very end (nothing follows): the last span runs to the end
            uncompressed_digest = pending.digest_before
            self._pending = self._pending_chash = self._next_chash = None
        else:
            uncompressed_digest = _sha256(self._uhash)
        end = _Checkpoint(self._received, total_out, 0, b"")
        self._close_span(end, _sha256(self._span_chash), uncompressed_digest)
        return self._spans, self._received, total_out
