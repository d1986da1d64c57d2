"""ROOT/lock: the daemon's exclusive flock on its root, with its pid written in the file.

The daemon takes it at start (RootLock); `lazysnap status` asks who holds it (lock_holder)
without taking anything: asking flock() itself could make a daemon starting that very moment
fail with "another daemon holds the lock", so it reads the kernel's lock table instead.
Standard library only: `lazysnap status` imports it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "lock"
PROC_LOCKS = "/proc/locks"


class RootLockError(Exception):
    """The root could not be locked; the message names the file. held: another process has it."""

    def __init__(self, message: str, *, held: bool) -> None:
        super().__init__(message)
        self.held = held


def lock_path(root: str) -> str:
    return os.path.join(root, LOCK_NAME)


@dataclass
class RootLock:
    """An exclusive flock on ROOT/lock, holding our pid for the error message of others."""

    path: str
    fd: int

    @classmethod
    def acquire(cls, root: str) -> RootLock:
        path = lock_path(root)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RootLockError(
                f"another lazysnap daemon holds {path} (pid {holder})", held=True
            ) from None
        except OSError as err:
            os.close(fd)
            raise RootLockError(f"cannot lock {path}: {err.strerror}", held=False) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        os.close(self.fd)  # closing drops the flock; the file stays (its pid is then stale)


@dataclass(frozen=True)
class LockHolder:
    path: str
    pid: int | None  # the pid in the file; None if it names none (or there is no file)
    held: bool  # the flock is held right now: a daemon serves this root


def lock_holder(root: str) -> LockHolder:
    """Who holds the root's lock, read without taking it (the file and /proc/locks)."""
    path = lock_path(root)
    try:
        text = Path(path).read_text().strip()
        st = os.stat(path)
    except OSError:
        return LockHolder(path, None, False)
    return LockHolder(path, int(text) if text.isdigit() else None, _flock_held(st))


def _flock_held(st: os.stat_result) -> bool:
    """True if /proc/locks lists a flock on the file (device major:minor:inode)."""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path(PROC_LOCKS).read_text()
    except OSError:
        return False
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; "->" marks a waiter, not a holder
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return True
    return False


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
