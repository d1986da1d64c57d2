"""Verified span cache on disk, shared by every mount (and mount process) using the same blob.

Layout under the cache directory:
    spans/<algorithm>/<hex>/<span number>   header + inflated, verified bytes of one span
    tmp/<pid>.<random>                      a span being written, at its full size from the
                                            start (its reservation); renamed into spans/
    users/<algorithm>/<hex>/<key>           one empty file per mount serving the blob: the spans
                                            of a blob are deleted when its last user is released
    lock                                    flock'd by whoever changes spans/, tmp/ or the ledger
    ledger                                  "<bytes> <spans>": bytes of span files and reserved
                                            temp files; span files (cache_ledger.py)

A span number only means something together with the index that numbered the spans, and one
blob can have several indexes (another --span-size, a rebuilt artifact) whose mounts share this
cache. So each file starts with a header holding the sha256 of the bytes that follow, and a
read names the digest it expects: span 3 of a 1 MiB-span index is never served for span 3 of a
4 MiB-span index of the same blob, even when the two happen to have the same size.

The cache never holds more than max_bytes, counting spans being written: a put first reserves
room under the lock (evicting if need be) by creating its temp file in tmp/ at the span's full
size (fallocate), and only then writes the bytes outside the lock. So spans/ plus tmp/ stay
within the bound at every moment another process can look, whatever number of writers and
processes share the cache. The ledger counts reserved temp files too.

A crash never leaves a partial span visible (write to tmp/, then rename), and as the rename is
not preceded by an fsync (a demand read would wait for it), a power loss may still leave a span
of the right size but not its bytes: each process hashes a span file the first time it reads
it, and a file that does not match its header is dropped as a miss. Eviction is LRU by
mtime (touched on use) and unlinks files: a reader that already opened a span keeps reading it,
and a reader that finds it gone treats it as a miss. The ledger may only over-count (it is
raised before room is used and lowered only by what this process removed itself, and the scan
that eviction does recounts it), so the cache never grows past max_bytes because of it. Temp
files of dead processes (or stale ones) are removed by that scan, which also drops their
reservation.

The disk: the cache also keeps a free-space reserve on its filesystem (disk_reserve.py),
whatever max_bytes says: a put that would leave less free evicts LRU spans first, and if that
cannot make room it stores nothing (the reader serves the span from memory).

Privacy: directories are created 0700 and files 0600 whatever the umask (cache_dirs.py); spans/
and tmp/ are tightened at open, so the spans a former version left readable are not reachable
by other users either.

Beside this module: cache_ledger.py (the ledger file), cache_temp.py (the temp files that
reserve room), cache_users.py (the users/ records), disk_reserve.py, cache_errors.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.fs.cache_dirs import FILE_MODE, entries, make_private_dirs, private_directory
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.cache_ledger import CacheLedger
from snapshotter.fs.cache_temp import (
    allocate,
    create_temp,
    remove_orphaned_temp_files,
    reserved_bytes,
)
from snapshotter.fs.cache_users import CacheUsers
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.disk_reserve import NO_RESERVE, DiskGuard, DiskReserve

_DIGEST = re.compile(r"^([a-z0-9]+):([a-f0-9]{32,128})$")


def layer_directory(spans_dir: Path, layer_digest: str) -> Path:
    """Where one layer's spans live under a cache's spans/ directory: <algorithm>/<hex>."""
    match = _DIGEST.match(layer_digest)
    if match is None:
        raise CacheError(f"span cache: {layer_digest!r} is not a digest (algorithm:hex)")
    return spans_dir / match.group(1) / match.group(2)


_SHA256 = re.compile(r"^sha256:([a-f0-9]{64})$")
# "lzspan1\0" + the raw sha256 of the span's bytes. Files of the header-less format have the
# wrong size for every span, so they are dropped as damaged and fetched again.
_MAGIC = b"lzspan1\0"
HEADER_SIZE = len(_MAGIC) + 32
_HASH_CHUNK = 1 << 20

log = logging.getLogger("lazysnap.fs")
_TOUCH_INTERVAL_S = 1.0  # LRU resolution; spares a utime() syscall per FUSE read


@dataclass(frozen=True)
class CacheUsage:
    bytes: int
    spans: int


@dataclass(frozen=True)
class _SpanFile:
    path: Path
    size: int
    mtime_ns: int


class SpanCache:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        reserve: DiskReserve = NO_RESERVE,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_bytes <= 0:
            raise CacheError(f"span cache {directory}: max_bytes must be positive, not {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.reserve = reserve
        self.clock = clock
        self._spans = self.directory / "spans"
        self._tmp = self.directory / "tmp"
        self._users = CacheUsers(self.directory / "users")
        self._disk = DiskGuard(self.directory, reserve)
        self._lock_path = self.directory / "lock"
        self._ledger = CacheLedger(self.directory / "ledger")
        self._touched: dict[Path, float] = {}
        self._touch_lock = threading.Lock()
        # (st_dev, st_ino) of span files whose bytes this process has checked against their
        # header, or written itself: checked once, as files are replaced, never changed
        self._checked: set[tuple[int, int]] = set()
        self._checked_lock = threading.Lock()
        try:
            if not self.directory.exists():
                private_directory(self.directory)
            for sub in (self._spans, self._tmp, self._users.directory):
                private_directory(sub)
        except OSError as exc:
            raise CacheError(f"span cache {self.directory}: cannot create: {exc}") from exc
        remove_orphaned_temp_files(self._tmp)

    def span_path(self, layer_digest: str, span_no: int) -> Path:
        if span_no < 0:
            raise CacheError(f"span cache: span number {span_no} of {layer_digest} is negative")
        return layer_directory(self._spans, layer_digest) / str(span_no)

    def stored_size(self, span_size: int) -> int:
        """Bytes a span of span_size bytes takes in the cache (what max_bytes bounds)."""
        return HEADER_SIZE + span_size

    def read(
        self,
        layer_digest: str,
        span_no: int,
        offset: int,
        length: int,
        expected_size: int,
        expected_digest: str,
    ) -> bytes | None:
        """length bytes at offset of the cached span, or None on a miss.

        expected_digest is the sha256 of the whole span as the reader's index has it: a span
        that another index of the blob numbered the same way is a miss, not data. A file of the
        wrong size (damaged outside our control, or of an older format) is dropped.
        """
        path = self.span_path(layer_digest, span_no)
        header = _header(expected_digest)
        if offset < 0 or length < 0 or offset + length > expected_size:
            raise CacheError(
                f"span cache: {offset}+{length} is outside span {span_no} of {layer_digest} "
                f"({expected_size} bytes)"
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != HEADER_SIZE + expected_size:
                self._drop(path)
                return None
            if os.pread(fd, HEADER_SIZE, 0) != header:
                return None  # another index's span (or another layout); put() replaces it
            if not self._verified(fd, st, header, path):
                return None
            data = os.pread(fd, length, HEADER_SIZE + offset)
        finally:
            os.close(fd)
        if len(data) != length:  # cannot happen to a file of the right size; never serve it
            return None
        self._touch(path)
        return data

    def contains(self, layer_digest: str, span_no: int, expected_digest: str = "") -> bool:
        """A file for the span is there (holding expected_digest's bytes, when given)."""
        path = self.span_path(layer_digest, span_no)
        if not expected_digest:
            return path.exists()
        try:
            with open(path, "rb") as cached:
                return cached.read(HEADER_SIZE) == _header(expected_digest)
        except FileNotFoundError:
            return False

    def put(self, layer_digest: str, span_no: int, data: bytes, digest: str) -> bool:
        """Store a verified span whose sha256 is digest; False if it cannot fit (bigger than the
        cache, or the rest is reserved by spans other writers are storing right now). A file of
        another index's span under the same number is replaced."""
        path = self.span_path(layer_digest, span_no)
        header = _header(digest)
        size = HEADER_SIZE + len(data)
        if size > self.max_bytes:
            return False
        if self._holds(path, header):  # another reader or process stored it first
            self._touch(path, force=True)
            return True
        reservation = self._reserve(path, header, size)
        if isinstance(reservation, bool):
            return reservation
        tmp, fd = reservation
        committed = False
        try:
            _write_all(fd, header, 0)
            _write_all(fd, data, HEADER_SIZE)
            written = os.fstat(fd)
            renamed = self._commit(path, header, tmp, size)
            committed = True
        finally:
            os.close(fd)
            if not committed:  # a write failed (disk full?): give the room back
                with self._locked():
                    self._release(tmp, size)
        if renamed:
            self._remember_checked(written)  # data is the verified span itself
        return renamed or self._holds(path, header)

    def add_user(self, layer_digest: str, key: str) -> None:
        """Note that a mount (key: any stable name of it, e.g. its mountpoint) serves the blob,
        so that release_user() of another mount does not delete spans it still reads."""
        with self._locked():
            self._users.add(self._blob_dir(layer_digest), key)

    def release_user(self, layer_digest: str, key: str) -> int:
        """The mount key no longer serves the blob; if no other mount does, its spans are
        deleted (they would only wait for eviction, holding disk). Returns the bytes freed."""
        with self._locked():
            if not self._users.remove(self._blob_dir(layer_digest), key):
                return 0
            return self._delete_layer_spans(layer_digest)[1]

    def evict_layer(self, layer_digest: str) -> int:
        """Remove every cached span of layer_digest (all indexes' numbering of it); returns how
        many were removed. A reader that has a span open keeps reading it; others miss."""
        with self._locked():
            return self._delete_layer_spans(layer_digest)[0]

    def _delete_layer_spans(self, layer_digest: str) -> tuple[int, int]:
        """Under the cache lock: unlink every span of layer_digest and account for them;
        (spans removed, bytes freed)."""
        layer_dir = self.span_path(layer_digest, 0).parent
        removed = freed = 0
        total, count = self._read_ledger()  # before: a missing ledger is recounted by a scan
        for span in entries(layer_dir):
            try:
                size = span.stat().st_size
                os.unlink(span.path)
            except FileNotFoundError:
                continue
            removed += 1
            freed += size
        with contextlib.suppress(OSError):
            layer_dir.rmdir()
        if removed:
            self._write_ledger(max(0, total - freed), max(0, count - removed))
        return removed, freed

    def usage(self) -> CacheUsage:
        files = list(self._scan())
        return CacheUsage(bytes=sum(f.size for f in files), spans=len(files))

    def approximate_usage(self) -> CacheUsage:
        """The ledger's running total: cheap (no scan) and never below the real usage."""
        total, count = self._read_ledger()
        return CacheUsage(bytes=total, spans=count)

    # -- internals -----------------------------------------------------------------------------

    def _blob_dir(self, layer_digest: str) -> Path:
        """<algorithm>/<hex> of layer_digest: where its spans (and users) are."""
        return self.span_path(layer_digest, 0).parent.relative_to(self._spans)

    def _holds(self, path: Path, header: bytes) -> bool:
        try:
            with open(path, "rb") as existing:
                return existing.read(HEADER_SIZE) == header
        except FileNotFoundError:
            return False

    def _reserve(self, path: Path, header: bytes, size: int) -> tuple[Path, int] | bool:
        """Make room for size bytes and claim it with a temp file of that size, under the lock:
        (temp file, its fd open for writing); True if the span is there already (touched), False
        if it cannot fit now."""
        with self._locked():
            if self._holds(path, header):
                self._touch(path, force=True)
                return True
            claimed = self._claim_room(size)
            return claimed if claimed is not None else False

    def reserve_room(self, size: int) -> tuple[Path, int] | None:
        """Room for size bytes that are not a span (a mount's start-up pack, pack_store.py),
        counted like a span being written: a temp file of this process of that size in tmp/,
        open for writing, until release_room (or this process ends). None if it cannot fit
        (the cache's bound with what others reserve, or the disk reserve)."""
        if size > self.max_bytes:
            return None
        with self._locked():
            return self._claim_room(size)

    def release_room(self, path: Path, size: int) -> None:
        with self._locked():
            self._release(path, size)

    def _claim_room(self, size: int) -> tuple[Path, int] | None:
        """Evict until size more bytes fit, then take them with a temp file; under the lock."""
        total, count = self._read_ledger()
        if total + size > self.max_bytes:
            total, count = self._evict(self.max_bytes - size)
            if total + size > self.max_bytes:
                self._write_ledger(total, count)  # the rest is other writers' reservations
                return None
        if not self._room_on_disk(size):
            return None
        tmp, fd = create_temp(self._tmp)
        try:
            allocate(fd, size)
            self._write_ledger(total + size, count)
        except OSError as exc:
            os.close(fd)
            tmp.unlink()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._disk.no_space(exc.errno)
            return None
        except BaseException:
            os.close(fd)
            tmp.unlink()
            raise
        self._disk.space_taken()
        return tmp, fd

    def _room_on_disk(self, size: int) -> bool:
        """Whether size more bytes leave the disk reserve free, evicting least recently used
        spans until they do; logs once when they cannot. Under the lock."""
        return self._disk.room_for(size, self._evict_until)

    def _evict_until(self, enough: Callable[[], bool]) -> None:
        """Unlink least recently used spans until enough() (checked after each); under the
        lock."""
        files = sorted(self._scan(), key=lambda f: f.mtime_ns)
        freed_bytes, freed_spans = 0, 0
        for victim in files:
            try:
                victim.path.unlink()
            except FileNotFoundError:
                continue
            freed_bytes += victim.size
            freed_spans += 1
            with contextlib.suppress(OSError):
                victim.path.parent.rmdir()
            if enough():
                break
        if freed_spans:
            total, count = self._read_ledger()
            self._write_ledger(max(0, total - freed_bytes), max(0, count - freed_spans))

    def disk_room(self) -> int:
        """Bytes the cache may still add on its filesystem before reaching the reserve (without
        evicting); negative when the reserve is eaten into already."""
        return self._disk.room()

    def disk_limited(self) -> bool:
        """True while this process could not cache a span for lack of disk space."""
        return self._disk.limited()

    def _commit(self, path: Path, header: bytes, tmp: Path, size: int) -> bool:
        """Rename the filled temp file into place (its reservation becomes the span's room);
        False if it was not renamed: the span was stored by another writer meanwhile (ours is
        released), or the temp file is gone (removed as stale by another process's scan)."""
        with self._locked():
            replaced = 0
            try:
                with open(path, "rb") as existing:
                    if existing.read(HEADER_SIZE) == header:
                        self._touch(path, force=True)
                        self._release(tmp, size)
                        return False
                    replaced = os.fstat(existing.fileno()).st_size
            except FileNotFoundError:
                pass
            make_private_dirs(path.parent)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                return False
            total, count = self._read_ledger()
            if replaced:
                total, count = total - replaced, count - 1
            self._write_ledger(max(0, total), max(0, count) + 1)
            return True

    def _release(self, tmp: Path, size: int) -> None:
        """Give back a reservation that did not become a span; under the lock. Only what this
        call unlinks is taken off the ledger: a temp file someone else removed was recounted by
        their scan, and the ledger must never under-count."""
        try:
            tmp.unlink()
        except FileNotFoundError:
            return
        total, count = self._read_ledger()
        self._write_ledger(max(0, total - size), count)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open file description per call: flock then excludes other threads of this
        # process as well as other processes.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _evict(self, target_bytes: int) -> tuple[int, int]:
        """Unlink least recently used spans until at most target_bytes remain, counting the
        reservations of spans being written (never evicted); exact totals. A file the new span
        will replace is counted like any other: it takes room until the rename."""
        files = sorted(self._scan(), key=lambda f: f.mtime_ns)
        total = sum(f.size for f in files) + self._reserved_bytes()
        count = len(files)
        for victim in files:
            if total <= target_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                victim.path.unlink()
            total -= victim.size
            count -= 1
            with contextlib.suppress(OSError):  # empty layer directory: tidy, not required
                victim.path.parent.rmdir()
        return total, count

    def _scan(self) -> Iterator[_SpanFile]:
        for algorithm in entries(self._spans):
            for layer in entries(Path(algorithm.path)):
                for span in entries(Path(layer.path)):
                    try:
                        st = span.stat()
                    except FileNotFoundError:
                        continue
                    yield _SpanFile(Path(span.path), st.st_size, st.st_mtime_ns)

    def _reserved_bytes(self) -> int:
        return reserved_bytes(self._tmp, self.clock.time())

    def _read_ledger(self) -> tuple[int, int]:
        record = self._ledger.read()
        if record is not None:
            return record
        files = list(self._scan())  # missing or torn: recount
        return sum(f.size for f in files) + self._reserved_bytes(), len(files)

    def _write_ledger(self, total: int, count: int) -> None:
        self._ledger.write(total, count)

    def _verified(self, fd: int, st: os.stat_result, header: bytes, path: Path) -> bool:
        """Whether the span file's bytes match the digest in its header, hashed the first time
        this process reads the file: a span written by a process that crashed before its data
        reached the disk, or damaged later, must be a miss, never data."""
        with self._checked_lock:
            if (st.st_dev, st.st_ino) in self._checked:
                return True
        digest = hashlib.sha256()
        position = HEADER_SIZE
        while chunk := os.pread(fd, _HASH_CHUNK, position):
            digest.update(chunk)
            position += len(chunk)
        if _MAGIC + digest.digest() != header:
            log.warning("span cache: %s does not match its digest; dropped", path)
            self._drop(path)
            return False
        self._remember_checked(st)
        return True

    def _remember_checked(self, st: os.stat_result) -> None:
        with self._checked_lock:
            if len(self._checked) > 65536:
                self._checked.clear()
            self._checked.add((st.st_dev, st.st_ino))

    def _drop(self, path: Path) -> None:
        with self._locked(), contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _touch(self, path: Path, *, force: bool = False) -> None:
        now = self.clock.monotonic()
        with self._touch_lock:
            if not force and now - self._touched.get(path, -_TOUCH_INTERVAL_S) < _TOUCH_INTERVAL_S:
                return
            self._touched[path] = now
            if len(self._touched) > 65536:
                self._touched.clear()
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)


def _header(digest: str) -> bytes:
    match = _SHA256.match(digest)
    if match is None:
        raise CacheError(f"span cache: {digest!r} is not a sha256 digest of a span")
    return _MAGIC + bytes.fromhex(match.group(1))


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
