"""Directories of the span cache: created private whatever the umask, listed whatever removes
entries meanwhile.

Directories are 0700 and files 0600 (spans are plaintext of files the image may keep 0600).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> None:
    """Create path (and each missing parent) 0700, or tighten it to 0700 if it exists."""
    make_private_dirs(path)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)


def make_private_dirs(path: Path) -> None:
    """mkdir -p where every directory created is 0700 whatever the umask."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIR_MODE)
            os.chmod(directory, DIR_MODE)  # the umask may have taken bits off; none added


def entries(path: Path) -> list[os.DirEntry[str]]:
    """The entries of path; none when it is gone (another process may remove it any time)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
