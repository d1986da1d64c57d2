"""FUSE operations of one read-only lazy layer: the only module that imports the FUSE binding.

mfusepy (high-level, path based API) on libfuse3, multithreaded: libfuse3 negotiates 1 MiB
reads where libfuse2 stops at 128 KiB. In the high-level API a lookup is a getattr of the path.

The tree is immutable, so the kernel is told to answer repeats itself. A container start over
overlayfs otherwise costs ~5000 FUSE requests even when every byte is cached (traced warm run of
`import numpy, pandas`: 1963 getxattr, 1155 open + 1155 release, 359 readlink, ~390 dir ops):
- entry/attr/negative timeouts are a day, so lookups and stats are kernel dentry/inode cache hits;
- open answers ENOSYS once: the kernel then opens files itself, with FOPEN_KEEP_CACHE (pages
  stay across opens), and sends no OPEN or RELEASE again (reads come with the path instead);
- symlink targets are cached in the page cache (FUSE_CAP_CACHE_SYMLINKS);
- a layer without any xattr answers getxattr with ENOSYS once, so overlayfs's per-lookup checks of
  trusted.overlay.* never reach us (callers then see EOPNOTSUPP instead of ENODATA).
What remains of a warm run is ~400 opendir/readdir/releasedir (bench.warm_fuse: 97 listings,
~45 ms of a 0.29 s import). Python sees one readdir per listing (libfuse answers opendir,
releasedir and the last readdir in C): ~4 us + 0.75 us per entry, ~15 us + 1.1 us before
_LayerFUSE (bench.readdir_listing, entered from a C thread as libfuse does). Through a mount a
listing of 10-100 entries takes ~100-240 us (~140-340 before; docs/benchmarks.md), ~80 of them
the three synchronous round trips. libfuse 3.14's high-level API does not pass cache_readdir from
opendir to the kernel (fuse_lib_opendir copies only fh), and opendir must not answer ENOSYS
(FUSE_NO_OPENDIR_SUPPORT): the high-level readdir then dereferences the directory handle that
opendir never made (measured: SIGSEGV on the first listing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import threading
from typing import Any, Protocol

from snapshotter.fs.activity import BusyMeter, NodeActivity
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.fs.tree import Inode, LayerTree
from snapshotter.index.model import TocEntry

LIBFUSE3 = "libfuse3.so.3"
# An immutable tree never goes stale; a day is long enough to make lookups free.
CACHE_TIMEOUT_S = 86400.0
FS_SUBTYPE = "lazysnap"
MAX_THREADS = 16  # FUSE request threads; most of them wait on span fetches, not the CPU
FUSE_CAP_CACHE_SYMLINKS = 1 << 23  # libfuse3 fuse_common.h

log = logging.getLogger("lazysnap.fs")


# mfusepy picks its library at import time: make it libfuse3 unless the caller chose one.
os.environ.setdefault("FUSE_LIBRARY_PATH", ctypes.util.find_library("fuse3") or LIBFUSE3)
import mfusepy  # noqa: E402

if mfusepy.fuse_version_major != 3:
    raise ImportError(
        f"FUSE library {os.environ['FUSE_LIBRARY_PATH']} is libfuse "
        f"{mfusepy.fuse_version_major}; lazysnap needs libfuse3 (1 MiB reads)"
    )


# libfuse >= 3.1: drop the kernel's cached pages, attributes and dentry of a path (refuse()).
_invalidate_path = getattr(mfusepy._libfuse, "fuse_invalidate_path", None)
if _invalidate_path is not None:
    _invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _invalidate_path.restype = ctypes.c_int


class AccessRecorder(Protocol):
    """Told every read of a file's data: its entry, offset and size (profile recording)."""

    def read(self, entry: TocEntry, offset: int, size: int) -> None: ...


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
        self._has_xattrs: bool | None = None  # found on the first getxattr, off the startup path
        # Set when the layer failed its completion check: every request but statfs (and a stat
        # of the root, so the mount stays recognisable as a live one) fails with EIO.
        self.refused: str | None = None
        self._fuse: int | None = None  # libfuse's struct fuse *, taken in init
        # A burst of requests (a container starting) holds back background work node-wide.
        self.busy_meter = BusyMeter(NodeActivity(reader.cache.directory, reader.clock))

    # -- setup -----------------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        self._fuse = mfusepy._libfuse.fuse_get_context().contents.fuse
        if conn is not None and conn.capable & FUSE_CAP_CACHE_SYMLINKS:
            conn.want |= FUSE_CAP_CACHE_SYMLINKS
        if config is not None:
            config.use_ino = 1  # st_ino from the tree, stable across remounts
            config.kernel_cache = 1  # never drop cached pages on open: data cannot change
            config.entry_timeout = CACHE_TIMEOUT_S
            config.attr_timeout = CACHE_TIMEOUT_S
            config.negative_timeout = CACHE_TIMEOUT_S

    def refuse(self, why: str) -> None:
        """Fail closed from now on: every later request gets EIO, and what the kernel cached
        (pages, attributes, dentries) is dropped so it asks again. Call from outside a FUSE
        request (the state keeper's thread): notifying the kernel from inside one can block."""
        if self.refused is not None:
            return
        self.refused = why
        log.error("refusing every read of this layer (EIO): %s", why)
        fuse = self._fuse
        if _invalidate_path is None or not fuse:
            return
        for name, _ in self.tree.walk():
            _invalidate_path(fuse, ("/" + name).encode("utf-8", "surrogateescape"))

    def _check_refused(self, path: str | None = None) -> None:
        if self.refused is not None and path != "/":
            raise _fail(errno.EIO)

    # -- metadata --------------------------------------------------------------------------------

    def _node(self, path: str) -> Inode:
        self._check_refused(path)
        node = self.tree.lookup(path)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        self.busy_meter.tick(_caller_pid())
        self._check_refused(path)
        node = self.tree.inode(fh) if fh else None
        return _attributes(node or self._node(path))

    def directory(self, path: str) -> Inode:
        """The directory to list at path (what a readdir request needs first)."""
        self.busy_meter.tick(_caller_pid())
        self._check_refused()
        node = self._node(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return node

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # mfusepy's listing API; having it registers the readdir callback. serve() fills
        # listings through _LayerFUSE.readdir_fuse_3 instead: the same entries, cheaper.
        node = self.directory(path)
        entries = [
            (".", {"st_mode": node.mode, "st_ino": node.ino}, 0),
            ("..", {"st_mode": stat.S_IFDIR, "st_ino": node.ino}, 0),
        ]
        entries.extend(
            (name, {"st_mode": child.mode, "st_ino": child.ino}, 0)
            for name, child in node.children.items()
        )
        return entries

    def readlink(self, path: str) -> str:
        self.busy_meter.tick(_caller_pid())
        node = self._node(path)
        if not stat.S_ISLNK(node.mode):
            raise _fail(errno.EINVAL)
        return node.symlink_target

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        self._check_refused()
        if self._has_xattrs is None:
            self._has_xattrs = any(node.xattrs for _, node in self.tree.walk())
        if not self._has_xattrs:
            raise _fail(errno.ENOSYS)  # the kernel stops asking this mount for xattrs
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
        # No per-open state: ENOSYS makes the kernel stop sending OPEN/RELEASE for this mount
        # and keep file pages across opens. The mount is read-only (ro), so the VFS already
        # refuses opens for writing with EROFS.
        raise _fail(errno.ENOSYS)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        self.busy_meter.tick(_caller_pid())
        self._check_refused()
        node = self.tree.inode(fh) if fh else None
        if node is None and path is not None:
            node = self.tree.lookup(path)
        if node is None:
            raise _fail(errno.EBADF)
        if node.data is None:  # not a regular file, or an empty one
            return b""
        if self.recorder is not None:
            self.recorder.read(node.data, offset, size)
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


# Whether this thread (a libfuse worker) keeps its Python thread state between requests.
_thread_state = threading.local()


class _LayerFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with cheaper requests:
    - Each request calls Python through a ctypes callback on a libfuse worker thread, which
      has no Python thread state of its own: ctypes makes one per call and deletes it after,
      ~8 us of the ~8.1 us such a call costs (measured). Each worker keeps the one it got on
      its first request instead; the workers never exit (serve: max_idle_threads), so that is
      at most MAX_THREADS thread states, a few KiB each.
    - mfusepy's own readdir takes a list of (name, {st_mode, st_ino}, offset) and copies each
      dict into a c_stat; here the tree's children go to libfuse's filler directly (~0.7
      instead of ~1.1 us per entry)."""

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_thread_state, "kept", False):
            # One more PyGILState_Ensure than Release: the thread state outlives the call.
            ctypes.pythonapi.PyGILState_Ensure()
            _thread_state.kept = True
        return super()._wrapper(func, *args, **kwargs)

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        if path is None:  # only with nullpath_ok, which this mount does not set
            raise _fail(errno.EBADF)
        operations: LayerOperations = self.operations
        node = operations.directory(path.decode(self.encoding, self.errors))
        _fill_listing(node, buf, filler)
        return 0


def _fill_listing(node: Inode, buf: Any, filler: Any) -> None:
    """Give libfuse's filler every entry of a directory with offset 0 (libfuse keeps the whole
    listing and answers the kernel's later READDIRs itself). A listing carries a name, the file
    type (from st_mode) and, with use_ino, st_ino; libfuse copies them from the c_stat at each
    call, so one c_stat serves all entries. A non-zero return means libfuse's buffer is full."""
    attributes = mfusepy.c_stat()
    attributes.st_mode = node.mode
    attributes.st_ino = node.ino
    if filler(buf, b".", attributes, 0, 0):
        return
    # The tree keeps no parent links: '..' is a directory with this directory's st_ino, as it
    # was under mfusepy's own readdir (stat of '..' goes through lookup, never through here).
    attributes.st_mode = stat.S_IFDIR
    if filler(buf, b"..", attributes, 0, 0):
        return
    for name, child in node.children.items():
        attributes.st_mode = child.mode
        attributes.st_ino = child.ino
        if filler(buf, name.encode("utf-8", "surrogateescape"), attributes, 0, 0):
            return


def _caller_pid() -> int:
    """The pid of the process whose request this thread serves (0 outside a request)."""
    context = mfusepy._libfuse.fuse_get_context()
    return int(context.contents.pid) if context else 0


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
        # Idle workers never exit, so the Python thread states they keep (_LayerFUSE) stay
        # bounded; explicit also because libfuse 3.14 warns "invalid max threads value" else.
        "max_idle_threads": MAX_THREADS,
    }
    if allow_other:
        options["allow_other"] = True  # container processes run as other uids
    _LayerFUSE(operations, mountpoint, **options)
