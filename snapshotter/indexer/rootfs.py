"""An image's root filesystem as overlayfs would show it, from the layers' TOCs alone.

Layers are applied bottom to top. A layer's whiteouts (`.wh.NAME`: NAME and everything under
it is gone; `.wh..wh..opq`: the directory's lower contents are gone) apply to the layers below
it, then its entries are added: a directory merges with a lower directory, anything else
replaces what was at that path (a lower directory's contents with it). Paths are resolved the
way the kernel resolves them inside the container's root: an absolute symlink target starts
again at the image's root (never the host's), `..` stops at the root, and more than 40 symlinks
on one path (the kernel's limit) is a loop.

No I/O. Used by the static start-up profile (indexer/static_profile.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapshotter.index.model import EntryType, TocEntry

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINKS = 40  # the kernel's limit on symlinks followed while resolving one path


class ResolveError(ValueError):
    """A path that cannot be resolved: a symlink loop; the message names the path."""


@dataclass(frozen=True)
class RootEntry:
    """The entry visible at a path: which layer (index into the image's layers) holds it."""

    layer: int
    entry: TocEntry


class RootFs:
    def __init__(self) -> None:
        self._nodes: dict[str, RootEntry] = {}  # path -> visible entry ("" is the root)
        self._children: dict[str, set[str]] = {"": set()}  # directory path -> child names

    @classmethod
    def from_layers(cls, layers: Sequence[Iterable[TocEntry]]) -> RootFs:
        """The merged view of layers, bottom layer first."""
        root = cls()
        for number, entries in enumerate(layers):
            root.add_layer(number, entries)
        return root

    def add_layer(self, number: int, entries: Iterable[TocEntry]) -> None:
        kept: list[TocEntry] = []
        for entry in entries:
            parent, _, base = entry.name.rpartition("/")
            if base == OPAQUE_MARKER:
                for child in list(self._children.get(parent, ())):
                    self._remove(_join(parent, child))
            elif base.startswith(WHITEOUT_PREFIX):
                self._remove(_join(parent, base[len(WHITEOUT_PREFIX) :]))
            else:
                kept.append(entry)
        for entry in kept:
            self._add(RootEntry(number, entry))

    def _add(self, node: RootEntry) -> None:
        path = node.entry.name
        parent, _, base = path.rpartition("/")
        self._ensure_directory(parent)
        old = self._nodes.get(path)
        is_dir = node.entry.type is EntryType.DIR
        if old is not None and (old.entry.type is EntryType.DIR) != is_dir:
            self._remove(path)
        elif old is None and not is_dir and path in self._children:
            self._remove(path)  # an implicit directory (children, no entry of its own)
        self._nodes[path] = node
        self._children[parent].add(base)
        if is_dir:
            self._children.setdefault(path, set())

    def _ensure_directory(self, path: str) -> None:
        missing: list[str] = []
        while path not in self._children:
            missing.append(path)
            path = path.rpartition("/")[0]
        for directory in reversed(missing):
            parent, _, base = directory.rpartition("/")
            old = self._nodes.get(directory)
            if old is not None:  # a lower non-directory under a directory of this layer
                self._remove(directory)
            self._children[directory] = set()
            self._children[parent].add(base)

    def _remove(self, path: str) -> None:
        """path and everything under it (iteratively: a hostile layer may nest deeply)."""
        parent, _, base = path.rpartition("/")
        if parent in self._children:
            self._children[parent].discard(base)
        todo = [path]
        while todo:
            current = todo.pop()
            self._nodes.pop(current, None)
            for child in self._children.pop(current, ()):
                todo.append(_join(current, child))

    def entry(self, path: str) -> RootEntry | None:
        """The entry at a resolved path (None: absent, or a directory no layer has an entry
        for)."""
        return self._nodes.get(path)

    def is_dir(self, path: str) -> bool:
        return path in self._children

    def listdir(self, path: str) -> list[str]:
        """Names in a resolved directory, sorted ([] when it is not one)."""
        return sorted(self._children.get(path, ()))

    def resolve(self, path: str, cwd: str = "", *, follow_last: bool = True) -> str | None:
        """The resolved path (relative, "" for the root) of `path` inside the image, relative
        paths from the resolved directory `cwd`; None when a component is missing or not a
        directory; ResolveError for a symlink loop."""
        parts: deque[str] = deque(_split(path))
        current: list[str] = [] if path.startswith("/") else _split(cwd)
        links = 0
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if current:
                    current.pop()
                continue
            candidate = "/".join([*current, name])
            node = self._nodes.get(candidate)
            if node is None and candidate not in self._children:
                return None
            follow = bool(parts) or follow_last
            if node is not None and node.entry.type is EntryType.SYMLINK and follow:
                links += 1
                if links > MAX_SYMLINKS:
                    raise ResolveError(
                        f"{path}: more than {MAX_SYMLINKS} symlinks (a symlink loop)"
                    )
                target = node.entry.link_target
                if target.startswith("/"):
                    current = []
                parts.extendleft(reversed(_split(target)))
                continue
            if parts and candidate not in self._children:
                return None  # not a directory
            current.append(name)
        return "/".join(current)


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name
