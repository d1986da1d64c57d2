"""What the core tells containerd about a snapshot: Info (Stat, List, Update) and Usage (its
disk usage, counted as containerd's fs.DiskUsage does), the label size rule containerd applies,
and the fields List's filters look up (containerd's storage.adaptSnapshot)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from snapshotter.core import filters
from snapshotter.core.errors import InvalidArgument
from snapshotter.core.metadata import Kind, SnapshotRecord

MAX_LABEL_SIZE = 4096  # containerd labels.Validate: len(key) + len(value), in bytes


@dataclass(frozen=True)
class Info:
    name: str
    parent: str = ""
    kind: Kind = Kind.ACTIVE
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True)
class Usage:
    size: int = 0  # bytes allocated (st_blocks * 512), each inode counted once
    inodes: int = 0


def info_of(record: SnapshotRecord) -> Info:
    """What Stat, List and Update return for a snapshot."""
    return Info(
        name=record.key,
        parent=record.parent,
        kind=record.kind,
        labels=dict(record.labels),
        created_ns=record.created_ns,
        updated_ns=record.updated_ns,
    )


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's labels.Validate: InvalidArgument for a label over MAX_LABEL_SIZE."""
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                f"key: {key[:10]}"
            )


def disk_usage(path: str) -> Usage:
    """Like containerd's fs.DiskUsage: every inode under path (path included) counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    root = os.lstat(path)
    pending: list[tuple[str, os.stat_result]] = [(path, root)]
    while pending:
        current, st = pending.pop()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(current) as entries:
                for entry in entries:
                    pending.append((entry.path, entry.stat(follow_symlinks=False)))
    return Usage(size=size, inodes=len(seen))


def filter_fields(record: SnapshotRecord) -> filters.Adaptor:
    """Field lookup for filters, as containerd's storage.adaptSnapshot."""

    def field_value(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "kind":
            return record.kind.label, True
        if path[0] == "name":
            return record.key, True
        if path[0] == "parent":
            return record.parent, True
        if path[0] == "labels":
            if not record.labels:
                return "", False
            label = ".".join(path[1:])
            if label in record.labels:
                return record.labels[label], True
            return "", False
        return "", False

    return field_value
