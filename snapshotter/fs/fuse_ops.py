"""FUSE operations of one read-only lazy layer: the only module that imports the FUSE binding.

mfusepy (high-level, path based API) on libfuse3, multithreaded: libfuse3 negotiates 1 MiB
reads where libfuse2 stops at 128 KiB. The tree is immutable, so the kernel may cache
everything: kernel_cache keeps file pages across opens, and entry/attr/negative timeouts are
long. In the high-level API a lookup is a getattr of the path.
"""

from __future__ import annotations

import ctypes.util
import errno
import logging
import os
import stat
from typing import Any, Protocol

from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.fs.tree import Inode, LayerTree

LIBFUSE3 = "libfuse3.so.3"
# An immutable tree never goes stale; a day is long enough to make lookups free.
CACHE_TIMEOUT_S = 86400.0
FS_SUBTYPE = "lazysnap"
MAX_THREADS = 16  # FUSE request threads; most of them wait on span fetches, not the CPU

log = logging.getLogger("lazysnap.fs")


# mfusepy picks its library at import time: make it libfuse3 unless the caller chose one.
os.environ.setdefault("FUSE_LIBRARY_PATH", ctypes.util.find_library("fuse3") or LIBFUSE3)
import mfusepy  # noqa: E402

if mfusepy.fuse_version_major != 3:
    raise ImportError(
        f"FUSE library {os.environ['FUSE_LIBRARY_PATH']} is libfuse "
        f"{mfusepy.fuse_version_major}; lazysnap needs libfuse3 (1 MiB reads)"
    )


class AccessRecorder(Protocol):
    """Told the entry name of every file whose data is read (profile recording)."""

    def first_read(self, name: str) -> None: ...


def _fail(code: int) -> Exception:
    return mfusepy.FuseOSError(code)  # type: ignore[no-any-return]


class LayerOperations(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True  # nanosecond timestamps, as the tar had them

    def __init__(
        self, tree: LayerTree, reader: LayerReader, recorder: AccessRecorder | None = None
    ) -> None:
        self.tree = tree
        self.reader = reader
        self.recorder = recorder
        self._fs_blocks = (tree.total_size + 4095) // 4096

    # -- setup -----------------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1  # st_ino from the tree, stable across remounts
            config.kernel_cache = 1  # never drop cached pages on open: data cannot change
            config.entry_timeout = CACHE_TIMEOUT_S
            config.attr_timeout = CACHE_TIMEOUT_S
            config.negative_timeout = CACHE_TIMEOUT_S

    # -- metadata --------------------------------------------------------------------------------

    def _node(self, path: str) -> Inode:
        node = self.tree.lookup(path)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        node = self.tree.inode(fh) if fh else None
        return _attributes(node or self._node(path))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        node = self._node(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        entries = [
            (".", {"st_mode": node.mode, "st_ino": node.ino}, 0),
            ("..", {"st_mode": stat.S_IFDIR}, 0),
        ]
        entries.extend(
            (name, {"st_mode": child.mode, "st_ino": child.ino}, 0)
            for name, child in node.children.items()
        )
        return entries

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if not stat.S_ISLNK(node.mode):
            raise _fail(errno.EINVAL)
        return node.symlink_target

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self._node(path).xattrs.get(name)
        if value is None:
            raise _fail(errno.ENODATA)
        return value

    def listxattr(self, path: str) -> list[str]:
        return list(self._node(path).xattrs)

    def statfs(self, path: str) -> dict[str, int]:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": self._fs_blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(self.tree),
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    # -- data ------------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _fail(errno.EROFS)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        return node.ino

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        node = self.tree.inode(fh)
        if node is None:
            raise _fail(errno.EBADF)
        if node.data is None:  # not a regular file, or an empty one
            return b""
        if self.recorder is not None:
            self.recorder.first_read(node.data.name)
        try:
            data = self.reader.read(node.data, offset, size)
        except SpanReadError as exc:
            log.error("EIO reading %s: %s", path or node.data.name, exc)
            raise _fail(errno.EIO) from None
        expected = max(0, min(size, node.data.size - offset))
        if len(data) != expected:
            # A short read mid-file would make the kernel zero-fill the page: mmapped code
            # would then crash far from here. Fail loudly instead.
            log.error(
                "EIO reading %s: %d bytes at %d gave %d",
                node.data.name,
                expected,
                offset,
                len(data),
            )
            raise _fail(errno.EIO)
        return data

    def release(self, path: str | None, fh: int) -> int:
        return 0


def _attributes(node: Inode) -> dict[str, int]:
    return {
        "st_ino": node.ino,
        "st_mode": node.mode,
        "st_nlink": node.nlink,
        "st_uid": node.uid,
        "st_gid": node.gid,
        "st_size": node.size,
        "st_rdev": node.rdev,
        "st_blocks": node.blocks,
        "st_blksize": 4096,
        "st_atime": node.mtime_ns,
        "st_mtime": node.mtime_ns,
        "st_ctime": node.mtime_ns,
    }


def serve(
    operations: LayerOperations, mountpoint: str, *, fsname: str, allow_other: bool = True
) -> None:
    """Mount and serve until unmounted or SIGTERM/SIGINT (libfuse's handlers); blocks."""
    options: dict[str, Any] = {
        "foreground": True,
        "ro": True,
        "default_permissions": True,  # the kernel checks modes: what a container expects
        "fsname": fsname,
        "subtype": FS_SUBTYPE,
        "max_threads": MAX_THREADS,
        # explicit, else libfuse 3.14 logs a spurious "invalid max threads value" warning
        "max_idle_threads": MAX_THREADS // 2,
    }
    if allow_other:
        options["allow_other"] = True  # container processes run as other uids
    mfusepy.FUSE(operations, mountpoint, **options)
