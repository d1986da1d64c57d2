"""Writing the daemon's and mount processes' own files: private (0600 whatever the umask:
spans, state and sidecar files describe what images hold) and replaced atomically (a reader
sees the old bytes or the new, never a torn file). Standard library only: status reads through
modules that import this. Errors are OSError; each caller names the file in its own error."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

MODE = 0o600


def write_private(path: Path, data: bytes) -> None:
    """Create or overwrite path with data, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, MODE)
    try:
        os.fchmod(fd, MODE)  # an existing file keeps its mode through O_CREAT
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def replace_private(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace path with data through a temp file and a rename, mode 0600. durable: fsync the
    file before the rename and the directory after it (a marker or a ledger that must survive
    a crash of the machine, not only of the process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write_private(tmp, data)
        if durable:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
