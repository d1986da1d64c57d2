"""rm -r of a directory tree of any depth, without recursion and without long paths.

Python 3.11's shutil.rmtree recurses once per directory level: a layer 3000 directories deep
(a crafted one, issue 12) raised RecursionError on every attempt to wipe or delete it. Walking
with absolute paths would fail too, once a path passes PATH_MAX. Here one directory fd is open
at a time: descend by name relative to it, climb back through "..", and remove entries relative
to the fd. Symlinks are removed, never followed. Used by fs (wiping a materialized copy) and by
core (removing snapshots), which otherwise import nothing of each other.
"""

from __future__ import annotations

import os

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove the directory path and everything under it; OSError as os.rmdir would raise.
    path must be a directory and is not followed if it is a symlink."""
    clear_directory(path)
    os.rmdir(path)


def clear_directory(path: str | os.PathLike[str]) -> None:
    """Remove everything inside the directory path, keeping the directory."""
    fd = os.open(path, _DIR_FLAGS)
    # (names of the subdirectories still to remove) per level from path down to fd
    pending: list[list[str]] = [_clear_files(fd)]
    try:
        while pending:
            if pending[-1]:
                child = os.open(pending[-1][-1], _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                pending.append(_clear_files(fd))
                continue
            pending.pop()
            if not pending:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(pending[-1].pop(), dir_fd=fd)
    finally:
        os.close(fd)


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in the directory fd; the names of its subdirectories."""
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs
