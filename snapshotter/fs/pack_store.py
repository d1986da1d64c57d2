"""One layer's section of the start-up pack (snapshotter/index/pack.py) in a mount process:
fetched in one Range request right at start, checked chunk by chunk (size and sha256 from the
signed profile before zstd sees a byte, output bounded by the declared size), kept on disk in
the cache directory (room reserved through the span cache, so it counts against the cache's
bound and its disk reserve), and serving what reads ask of its ranges (the rest of a read
that reaches past them comes from spans).

A read of a chunk still in flight waits for it (the pack is on its way; fetching spans for the
same bytes would only compete with it). When the pack cannot be used (no room, the registry
does not have it, bytes that do not verify, truncated), the error names the layer and the pack,
on_failure runs (the mount then prefetches the profile's files as without a pack) and every
read the pack has not served yet goes to spans: never a wrong byte, never a failed mount.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader_counters import SharedCounters
from snapshotter.fs.span_windows import BlobSource
from snapshotter.index.pack import (
    LayerPack,
    PackChunk,
    PackError,
    check_section_fits,
    open_chunk,
)

log = logging.getLogger("lazysnap.fs")

_KEEP_S = 60.0  # how often the reserved file's mtime is refreshed (cache_temp's stale rule)


class PackState(StrEnum):
    FETCHING = "fetching"
    READY = "ready"  # every chunk verified and on disk
    FAILED = "failed"  # reads go to spans
    RELEASED = "released"  # the layer converged: its room was given back


class PackStore:
    def __init__(
        self,
        layer_digest: str,
        pack: LayerPack,
        layer_size: int,
        source: BlobSource,
        cache: SpanCache,
        counters: SharedCounters,
        *,
        wait_timeout: float,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        """Raises PackError when the section does not fit the layer (layer_size: uncompressed
        bytes of its tar stream)."""
        self.layer_digest = layer_digest
        self.pack = pack
        self.where = f"start-up pack {pack.pack_digest} of layer {layer_digest}"
        check_section_fits(pack.section, layer_size, self.where)
        self._source = source
        self._cache = cache
        self._counters = counters
        self._wait_timeout = wait_timeout
        self._on_failure = on_failure
        # Ranges by tar offset: where each one's bytes are in the store file, in which chunk.
        placed: list[tuple[int, int, int, int]] = []
        position = 0
        for chunk_no, chunk in enumerate(pack.section.chunks):
            for r in chunk.ranges:
                placed.append((r.start, r.end, chunk_no, position))
                position += r.length
        placed.sort()
        self._starts = [p[0] for p in placed]
        self._placed = placed
        self.size = position
        self._arrived = [threading.Event() for _ in pack.section.chunks]
        self._verified = [False] * len(pack.section.chunks)
        self._lock = threading.Lock()
        self.state = PackState.FETCHING
        self._room: tuple[Path, int] | None = None  # (reserved file, its read fd)
        self._kept_at = 0.0
        self._thread = threading.Thread(target=self._fetch, name="pack", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def read(self, start: int, end: int, from_spans: Callable[[int, int], bytes]) -> bytes | None:
        """Bytes [start, end) of the tar stream when the pack holds some of them: those from
        the pack (waiting for chunks in flight), the others through from_spans(lo, hi) (a
        kernel read-ahead may reach past what the recording read). None when the pack holds
        none of them (or is not usable): read them all from spans."""
        if self.state in (PackState.FAILED, PackState.RELEASED):
            return None
        # (lo, hi, chunk, file offset): chunk -1 for a part the pack does not hold
        parts: list[tuple[int, int, int, int]] = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < end:
            if i < len(self._placed) and self._placed[i][1] <= position:
                i += 1
                continue
            if i >= len(self._placed) or self._placed[i][0] >= end:
                parts.append((position, end, -1, 0))
                break
            r_start, r_end, chunk_no, stored_at = self._placed[i]
            if r_start > position:
                parts.append((position, r_start, -1, 0))
                position = r_start
            stop = min(r_end, end)
            parts.append((position, stop, chunk_no, stored_at + position - r_start))
            position = stop
            i += 1
        if all(chunk_no < 0 for _, _, chunk_no, _ in parts):
            return None
        pieces = []
        for lo, hi, chunk_no, at in parts:
            data = self._stored(chunk_no, at, hi - lo) if chunk_no >= 0 else None
            pieces.append(data if data is not None else from_spans(lo, hi))
        with self._counters.lock:
            self._counters.values.pack_reads += 1
        return b"".join(pieces)

    def _stored(self, chunk_no: int, at: int, length: int) -> bytes | None:
        """length bytes of the store file from at, once chunk_no is in; None: not usable."""
        if not self._arrived[chunk_no].wait(self._wait_timeout) or not self._verified[chunk_no]:
            return None
        with self._lock:
            if self._room is None:
                return None
            try:
                data = os.pread(self._room[1], length, at)
            except OSError as exc:
                log.error("%s: reading the stored pack: %s (reading spans)", self.where, exc)
                return None
        return data if len(data) == length else None

    def fetching(self) -> bool:
        return self.state is PackState.FETCHING

    def keep(self, now: float) -> None:
        """Refresh the reserved file now and then: other processes' cache scans remove temp
        files not touched for a while (cache_temp.STALE_TEMP_S)."""
        with self._lock:
            if self._room is None or now - self._kept_at < _KEEP_S:
                return
            self._kept_at = now
            path = self._room[0]
        with contextlib.suppress(OSError):
            os.utime(path)

    def release(self) -> None:
        """Give the room back (the layer's spans are all local now, or the mount ends)."""
        with self._lock:
            room, self._room = self._room, None
            if self.state is not PackState.FAILED:
                self.state = PackState.RELEASED
        if room is not None:
            os.close(room[1])
            self._cache.release_room(room[0], self.size)
        for event in self._arrived:
            event.set()  # a read waiting on a chunk goes to spans

    # -- the fetch -------------------------------------------------------------------------------

    def _fetch(self) -> None:
        started = time.monotonic()
        section = self.pack.section
        reserved = self._cache.reserve_room(self.size)
        if reserved is None:
            self._fail(f"no room for its {self.size} bytes in the cache (or on its disk)")
            return
        path, write_fd = reserved
        try:
            read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(write_fd)
            self._cache.release_room(path, self.size)
            self._fail(f"opening {path}: {exc.strerror}")
            return
        with self._lock:
            self._room = (path, read_fd)
            self._kept_at = time.monotonic()
        feed = _ChunkFeed(self.where, section.chunks, write_fd, self._counters, self._chunk_in)
        try:
            stream = getattr(self._source, "stream", None)
            if stream is not None:  # the registry reader: each chunk is served once it is in
                stream(section.offset, section.length, feed.add)
            else:
                feed.add(self._source.read(section.offset, section.length))
            feed.finish()
        except PackError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # a blob source's errors name the blob and range
            self._fail(f"fetching bytes {section.offset}+{section.length}: {exc}")
            return
        finally:
            os.close(write_fd)
        with self._lock:
            if self.state is PackState.FETCHING:
                self.state = PackState.READY
        log.info(
            "%s: %d chunks, %d bytes (%d compressed) in %.2fs",
            self.where,
            len(section.chunks),
            self.size,
            section.length,
            time.monotonic() - started,
        )

    def _chunk_in(self, chunk_no: int) -> None:
        self._verified[chunk_no] = True
        self._arrived[chunk_no].set()

    def _fail(self, why: str) -> None:
        log.error("%s not used: %s (reading spans, prefetching the profile's files)", self.where,
                  why)  # fmt: skip
        with self._lock:
            self.state = PackState.FAILED
        self.release()
        try:
            self._on_failure()
        except Exception:  # the fallback is best effort: reads still go to spans
            log.exception("%s: starting the fallback prefetch", self.where)


class _ChunkFeed:
    """Takes the section's bytes as they arrive; each chunk, once all its bytes are in, is
    verified, inflated and written to the store file, and its readers go on."""

    def __init__(
        self,
        where: str,
        chunks: tuple[PackChunk, ...],
        fd: int,
        counters: SharedCounters,
        chunk_in: Callable[[int], None],
    ) -> None:
        self._where = where
        self._chunks = chunks
        self._fd = fd
        self._counters = counters
        self._chunk_in = chunk_in
        self._next = 0
        self._written = 0
        self._pending = bytearray()

    def add(self, data: bytes) -> None:
        with self._counters.lock:
            self._counters.values.pack_bytes += len(data)
        self._pending += data
        while self._next < len(self._chunks):
            chunk = self._chunks[self._next]
            if len(self._pending) < chunk.compressed_size:
                return
            frame = bytes(self._pending[: chunk.compressed_size])
            del self._pending[: chunk.compressed_size]
            plain = open_chunk(chunk, frame, f"{self._where}, chunk {self._next}")
            try:
                os.pwrite(self._fd, plain, self._written)
            except OSError as exc:
                raise PackError(f"{self._where}: storing chunk {self._next}: {exc}") from None
            self._written += len(plain)
            self._chunk_in(self._next)
            self._next += 1
        if self._pending:
            raise PackError(f"{self._where}: more bytes than its chunks declare")

    def finish(self) -> None:
        if self._next < len(self._chunks):
            raise PackError(
                f"{self._where}: truncated: {len(self._chunks) - self._next} chunks missing"
            )
