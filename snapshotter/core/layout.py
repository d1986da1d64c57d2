"""Where the core keeps a root's snapshots: ROOT/metadata.db, ROOT/snapshots/<id>/{fs,work}.

The snapshotter writes there; `lazysnap status` and the daemon's metrics find lazy layers
there (a lazy layer is mounted at its snapshot's fs directory). Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

METADATA_FILE = "metadata.db"
SNAPSHOTS = "snapshots"
UPPER = "fs"  # a snapshot's contents (overlayfs upperdir), or a lazy layer's mountpoint
WORK = "work"  # overlayfs workdir


def metadata_path(root: str) -> str:
    return os.path.join(root, METADATA_FILE)


def snapshots_dir(root: str) -> str:
    return os.path.join(root, SNAPSHOTS)


def snapshot_dir(root: str, snapshot_id: int) -> str:
    return os.path.join(snapshots_dir(root), str(snapshot_id))


def upper_dir(root: str, snapshot_id: int) -> str:
    """ROOT/snapshots/<id>/fs: the snapshot's files, where a lazy layer is mounted."""
    return os.path.join(snapshot_dir(root, snapshot_id), UPPER)


def snapshot_id_of(root: str, path: str) -> int | None:
    """The <id> of a path ROOT/snapshots/<id>/<name>; None for any other path."""
    parent = Path(path).parent
    if parent.parent == Path(snapshots_dir(root)) and parent.name.isdigit():
        return int(parent.name)
    return None
