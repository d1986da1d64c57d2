"""The span cache's size ledger: "<bytes> <spans>", the running total of span files plus
reserved temp files and the number of span files, so a put need not scan the cache to know
whether it fits.

Read and written only under the cache lock. Overwritten in place, always at the same width: a
new file renamed over the old one cost ~2 ms per update here (ext4 flushes a file that replaces
another on rename), twice per span stored, with every writer queued on the lock. A record that
a crash tore fails to parse: read() then says None and the cache recounts by a scan.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.fs.cache_dirs import FILE_MODE

_DIGITS = 20  # every record the same width: an in-place rewrite leaves no old tail


class CacheLedger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, int] | None:
        """(bytes, spans), or None when the ledger is missing or torn."""
        try:
            total, count = self.path.read_text().split()
            return int(total), int(count)
        except (FileNotFoundError, ValueError):
            return None

    def write(self, total: int, count: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            os.pwrite(fd, f"{total:0{_DIGITS}d} {count:0{_DIGITS}d}\n".encode(), 0)
        finally:
            os.close(fd)
