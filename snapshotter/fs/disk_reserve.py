"""The free space the span cache leaves on its filesystem, whatever its max_bytes says.

A put that would leave less than the reserve free evicts least recently used spans first (the
cache says how), and if that cannot make room stores nothing (the reader serves the span from
memory): containers writing to the same disk, and the metadata, keep working. Each condition
("reserve": at the reserve; "nospace": the disk said ENOSPC/EDQUOT) is logged once per process,
with the filesystem and the keys that change it, and again when it cleared.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from snapshotter.fs.cache_errors import CacheError

log = logging.getLogger("lazysnap.fs")
RESERVE_CONFIG_KEYS = "[cache] min_free_bytes / min_free_percent"


@dataclass(frozen=True)
class DiskReserve:
    """Free space the cache leaves on its filesystem: the larger of min_free_bytes and
    min_free_percent of the filesystem, but at most half of it (so a small disk still caches
    something rather than nothing)."""

    min_free_bytes: int = 1 << 30
    min_free_percent: float = 5.0

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0 or not 0 <= self.min_free_percent <= 50:
            raise CacheError(
                f"disk reserve: min_free_bytes must be >= 0 ({self.min_free_bytes}) and "
                f"min_free_percent within 0..50 ({self.min_free_percent})"
            )

    def bytes_for(self, filesystem_bytes: int) -> int:
        wanted = max(self.min_free_bytes, int(filesystem_bytes * self.min_free_percent / 100))
        return min(wanted, filesystem_bytes // 2)


NO_RESERVE = DiskReserve(0, 0.0)


@dataclass(frozen=True)
class DiskSpace:
    total: int
    free: int  # for an unprivileged writer (f_bavail): what root must not use up either


def disk_space(path: str | os.PathLike[str]) -> DiskSpace:
    st = os.statvfs(path)
    return DiskSpace(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


class DiskGuard:
    """One cache directory's reserve on its filesystem: whether a span fits, and the conditions
    this process has logged (until they clear)."""

    def __init__(self, directory: Path, reserve: DiskReserve) -> None:
        self.directory = directory
        self.reserve = reserve
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    def room_for(self, size: int, evict_until: Callable[[Callable[[], bool]], None]) -> bool:
        """Whether size more bytes leave the reserve free, after evict_until(enough) removed
        least recently used spans until enough() says they do; logs once when they cannot.
        Under the cache lock."""
        space = disk_space(self.directory)
        keep = self.reserve.bytes_for(space.total)
        if space.free - size >= keep:
            self._clear_reported("reserve")
            return True
        if keep:
            evict_until(lambda: disk_space(self.directory).free - size >= keep)
            space = disk_space(self.directory)
            if space.free - size >= keep:
                return True
        self._report(
            "reserve",
            "span cache %s: the filesystem %s has %d KiB free and keeps %d KiB free for "
            "containers, too little for a span of %d KiB: spans are served without being cached "
            "until there is room; free disk space, or lower %s, or move [cache] dir to a bigger "
            "filesystem",
            self.directory,
            self._mount_point(),
            space.free >> 10,
            keep >> 10,
            size >> 10,
            RESERVE_CONFIG_KEYS,
        )
        return False

    def no_space(self, error: int) -> None:
        """The disk refused the room for a span (error: ENOSPC or EDQUOT)."""
        self._report(
            "nospace",
            "span cache %s: no space left on %s (%s): spans are served without being "
            "cached until there is room; free disk space, or set %s higher, or move "
            "[cache] dir to a bigger filesystem",
            self.directory,
            self._mount_point(),
            os.strerror(error),
            RESERVE_CONFIG_KEYS,
        )

    def space_taken(self) -> None:
        """The disk gave the room for a span: a "nospace" condition has cleared."""
        self._clear_reported("nospace")

    def room(self) -> int:
        """Bytes the cache may still add before reaching the reserve (without evicting);
        negative when the reserve is eaten into already."""
        space = disk_space(self.directory)
        return space.free - self.reserve.bytes_for(space.total)

    def limited(self) -> bool:
        """True while this process could not cache a span for lack of disk space."""
        with self._report_lock:
            return bool(self._reported)

    def _report(self, condition: str, message: str, *args: object) -> None:
        with self._report_lock:
            if condition in self._reported:
                return
            self._reported.add(condition)
        log.warning(message, *args)

    def _clear_reported(self, condition: str) -> None:
        with self._report_lock:
            if condition not in self._reported:
                return
            self._reported.discard(condition)
        log.info("span cache %s: caching spans again (%s cleared)", self.directory, condition)

    def _mount_point(self) -> str:
        path = self.directory.resolve()
        while not os.path.ismount(path) and path != path.parent:
            path = path.parent
        return str(path)
