"""Temp files of spans being written, tmp/<pid>.<random>: each is created at the span's full
size, so it is the span's reservation of room until it is renamed into spans/. The files of
dead (or stale) writers are removed, giving their reservations back."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from snapshotter.fs.cache_dirs import FILE_MODE, entries

# A writer fills its reserved temp file straight from memory, within seconds; one this old
# belongs to a stopped or reused-pid process and would hold its reservation for ever.
STALE_TEMP_S = 600.0
_LEDGER_TEMP_PREFIX = "ledger."  # ledgers were once written there and renamed into place


def create_temp(directory: Path) -> tuple[Path, int]:
    """A new empty temp file of this process: (path, fd open for writing)."""
    path = directory / f"{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    return path, fd


def allocate(fd: int, size: int) -> None:
    """Give the file its full size now, so its room is taken before its bytes are written."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a file system without fallocate: the apparent size is taken


def reserved_bytes(directory: Path, now: float) -> int:
    """Bytes of the temp files of spans being written; removes those of dead (or stale)
    writers, whose reservations would otherwise never be given back. Under the cache lock."""
    total = 0
    for entry in entries(directory):
        if entry.name.startswith(_LEDGER_TEMP_PREFIX):
            continue  # written and renamed under the lock: only a crash leaves one
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        pid_text = entry.name.split(".", 1)[0]
        dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
        if dead or now - st.st_mtime > STALE_TEMP_S:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            continue
        total += st.st_size
    return total


def remove_orphaned_temp_files(directory: Path) -> None:
    """Remove the temp files of dead processes. Not under the lock: the ledger then over-counts
    their reservations until the next eviction scan recounts, which is the safe direction."""
    for entry in entries(directory):
        pid_text = entry.name.removeprefix(_LEDGER_TEMP_PREFIX).split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
