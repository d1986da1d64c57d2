"""The inode tree of one layer, built from its index TOC alone (no network).

The tree is what overlayfs expects to find in a lowerdir holding the extracted layer:
- parent directories the tar never lists get 0755 root:root (real images omit them);
- hardlinks share one inode and count in its nlink;
- a whiteout `.wh.NAME` is a character device 0/0 called NAME;
- an opaque marker `.wh..wh..opq` becomes xattr trusted.overlay.opaque="y" on its directory;
- a later entry with the same name replaces the earlier one (tar extraction order), except that
  a directory over a directory only updates its metadata, as `tar x` does;
- a symlink's mode is 0777 whatever its header says, as on every Linux filesystem.

Inode numbers are assigned in TOC order, so they are stable across remounts of the same index.
"""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from snapshotter.index.model import EntryType, LayerIndex, TocEntry

ROOT_INO = 1
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# `.wh..wh.*` names are bookkeeping of other tools (aufs hardlink dirs); tar extraction for
# overlay skips them, so do we.
META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
IMPLICIT_DIR_MODE = 0o755
SYMLINK_MODE = 0o777
DIR_SIZE = 4096

_TYPE_BITS = {
    EntryType.REG: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class LayerTreeError(ValueError):
    """The TOC cannot form a filesystem tree; the message names the offending entry."""


@dataclass(slots=True)
class Inode:
    """One file as the kernel sees it. Mutated only while the tree is being built."""

    ino: int
    mode: int  # st_mode, file type bits included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    nlink: int = 1
    symlink_target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data: TocEntry | None = None  # the entry whose bytes this regular file serves
    children: dict[str, Inode] = field(default_factory=dict)  # directories only

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def blocks(self) -> int:
        """st_blocks in 512-byte units, as a filesystem that stored the data would report."""
        if self.is_regular or self.is_dir:
            return (self.size + 511) // 512
        return 0


class LayerTree:
    """Immutable view of a layer's files: look up by path or inode number."""

    def __init__(self, root: Inode, by_ino: Mapping[int, Inode], entries_total: int) -> None:
        self.root = root
        self._by_ino = dict(by_ino)
        self.entries_total = entries_total

    @classmethod
    def from_index(cls, index: LayerIndex) -> LayerTree:
        # Tens of thousands of new inodes trigger full GC passes over everything alive (the
        # decoded index too) that find no garbage (nothing here is cyclic until the build is
        # done): they cost as much as the build itself in a mount process.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _Builder(index).build()
        finally:
            if was_enabled:
                gc.enable()

    def __len__(self) -> int:
        return len(self._by_ino)

    def inode(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def lookup(self, path: str) -> Inode | None:
        """Resolve "/a/b" (or "a/b"); symlinks are never followed."""
        node = self.root
        for part in path.split("/"):
            if not part or part == ".":
                continue
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """Every (path, inode) pair, parents before children; "" is the root."""
        pending: list[tuple[str, Inode]] = [("", self.root)]
        while pending:
            path, node = pending.pop()
            yield path, node
            for name, child in sorted(node.children.items(), reverse=True):
                pending.append((f"{path}/{name}" if path else name, child))

    @property
    def total_size(self) -> int:
        return sum(node.size for node in self._by_ino.values() if node.is_regular)


class _Builder:
    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        self.next_ino = ROOT_INO
        self.by_ino: dict[int, Inode] = {}
        self.root = self._new_inode(stat.S_IFDIR | IMPLICIT_DIR_MODE)
        self.root.size, self.root.nlink = DIR_SIZE, 2
        # "a/b" -> the directory there, so each entry finds its parent with one lookup instead
        # of a walk from the root (the walks were most of a 13k-entry layer's build time).
        # Only directories reached through directories are cached; replacing a directory
        # clears it (see _link).
        self.dirs: dict[str, Inode] = {"": self.root}
        self.replaced = False  # some name was linked over another inode

    def build(self) -> LayerTree:
        for entry in self.index.entries:
            self._add(entry)
        if not self.replaced:  # every inode made is still linked: no walk needed
            return LayerTree(self.root, self.by_ino, len(self.index.entries))
        # Inodes unlinked by a later duplicate and not kept alive by a hardlink disappear.
        reachable: dict[int, Inode] = {}
        for node in _reachable(self.root):
            reachable[node.ino] = node
        return LayerTree(self.root, reachable, len(self.index.entries))

    def _new_inode(self, mode: int) -> Inode:
        node = Inode(ino=self.next_ino, mode=mode)
        self.by_ino[node.ino] = node
        self.next_ino += 1
        return node

    def _add(self, entry: TocEntry) -> None:
        parts = _split(entry)
        if not parts:  # the layer's own "./" entry describes the root
            if entry.type is EntryType.DIR:
                _apply_metadata(self.root, entry)
            return
        *dir_parts, name = parts
        parent = self._directory(dir_parts, entry)
        if name == OPAQUE_MARKER:
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if name.startswith(META_PREFIX):
            return
        if name.startswith(WHITEOUT_PREFIX):
            self._link(parent, name[len(WHITEOUT_PREFIX) :], self._whiteout(entry))
            return
        if entry.type is EntryType.HARDLINK:
            self._link(parent, name, self._hardlink_target(entry))
            return
        existing = parent.children.get(name)
        if entry.type is EntryType.DIR and existing is not None and existing.is_dir:
            _apply_metadata(existing, entry)
            return
        self._link(parent, name, self._inode_for(entry))

    def _directory(self, parts: list[str], entry: TocEntry) -> Inode:
        """The directory at parts, creating implicit parents (0755 root:root) as tar does."""
        key = "/".join(parts)
        cached = self.dirs.get(key)
        if cached is not None:
            return cached
        node = self.root
        for depth, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                child = self._new_inode(stat.S_IFDIR | IMPLICIT_DIR_MODE)
                child.size, child.nlink = DIR_SIZE, 2
                self._link(node, part, child)
            elif not child.is_dir:
                where = "/".join(parts[: depth + 1])
                raise LayerTreeError(
                    f"layer {self.index.layer_digest}: entry {entry.name!r} lies under "
                    f"{where!r}, which is not a directory"
                )
            node = child
        self.dirs[key] = node
        return node

    def _link(self, parent: Inode, name: str, node: Inode) -> None:
        old = parent.children.get(name)
        if old is node:
            return
        if old is not None:
            self.replaced = True
            old.nlink -= 1
            if old.is_dir:
                parent.nlink -= 1
                # Cached paths through the replaced directory now lead elsewhere (rare: a
                # whiteout or a non-directory entry over a directory).
                self.dirs = {"": self.root}
        parent.children[name] = node
        if node.is_dir:
            parent.nlink += 1

    def _inode_for(self, entry: TocEntry) -> Inode:
        type_bits = _TYPE_BITS.get(entry.type)
        if type_bits is None:
            raise LayerTreeError(
                f"layer {self.index.layer_digest}: entry {entry.name!r} has unsupported type "
                f"{entry.type!s}"
            )
        node = self._new_inode(type_bits | (entry.mode & 0o7777))
        _apply_metadata(node, entry)
        if entry.type is EntryType.REG:
            node.size = entry.size
            node.data = entry
        elif entry.type is EntryType.DIR:
            node.size = DIR_SIZE
            node.nlink = 2
        elif entry.type is EntryType.SYMLINK:
            # Linux ignores a symlink's own permission bits and every unpack shows 0777
            # (lrwxrwxrwx) whatever the tar header says (often 0644 from some writers).
            node.mode = stat.S_IFLNK | SYMLINK_MODE
            node.symlink_target = entry.link_target
            node.size = len(entry.link_target.encode("utf-8", "surrogateescape"))
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            node.rdev = _makedev(entry.devmajor, entry.devminor)
        return node

    def _whiteout(self, entry: TocEntry) -> Inode:
        # What containerd's overlay applier creates: mknod(S_IFCHR, 0) with the entry's owner.
        node = self._new_inode(stat.S_IFCHR)
        node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
        return node

    def _hardlink_target(self, entry: TocEntry) -> Inode:
        target = self._lookup(entry.link_target)
        if target is None:
            raise LayerTreeError(
                f"layer {self.index.layer_digest}: hardlink {entry.name!r} points to "
                f"{entry.link_target!r}, which is not earlier in the layer"
            )
        if target.is_dir:
            raise LayerTreeError(
                f"layer {self.index.layer_digest}: hardlink {entry.name!r} points to "
                f"directory {entry.link_target!r}"
            )
        target.nlink += 1
        return target

    def _lookup(self, name: str) -> Inode | None:
        node = self.root
        for part in name.strip("/").split("/"):
            if part in ("", "."):
                continue
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node


def _split(entry: TocEntry) -> list[str]:
    parts = [part for part in entry.name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LayerTreeError(f"entry {entry.name!r}: '..' in a layer path")
    return parts


def _apply_metadata(node: Inode, entry: TocEntry) -> None:
    node.mode = stat.S_IFMT(node.mode) | (entry.mode & 0o7777)
    node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
    opaque = node.xattrs.get(OPAQUE_XATTR)
    node.xattrs = dict(entry.xattrs)
    if opaque is not None:  # the marker may come before the directory's own entry
        node.xattrs[OPAQUE_XATTR] = opaque


def _makedev(major: int, minor: int) -> int:
    return os.makedev(major, minor)


def _reachable(root: Inode) -> Iterator[Inode]:
    pending = [root]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if node.ino in seen:
            continue
        seen.add(node.ino)
        yield node
        pending.extend(node.children.values())
