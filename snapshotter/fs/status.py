"""What `lazysnap status` shows about lazy layers: one line per mount process (and whether its
layer went local), and the cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.fs.cache import CacheUsage, SpanCache
from snapshotter.fs.manager import mount_problem
from snapshotter.sidecars import read_marker, read_state

STATE_SUFFIX = ".lazysnap.json"


@dataclass(frozen=True)
class MountStatus:
    mountpoint: str
    layer_digest: str
    pid: int
    live: bool  # mounted, answering, and its process alive
    updated_at: float  # when the process last refreshed its counters
    counters: dict[str, int] = field(default_factory=dict)
    # Copied into plain files, FUSE detached (a process still listed serves containers that
    # started before); background: the process's background fetch state.
    local: bool = False
    background: str = ""


def mount_statuses(under: str) -> list[MountStatus]:
    """Every lazy mount whose state file lies below `under` (e.g. the daemon's root)."""
    found = []
    for state_path in _state_files(Path(under)):
        mountpoint = str(state_path)[: -len(STATE_SUFFIX)]
        state = read_state(mountpoint)
        if state is None:
            continue
        counters = state.get("counters")
        found.append(
            MountStatus(
                mountpoint=mountpoint,
                layer_digest=str(state.get("layer_digest", "")),
                pid=int(state.get("pid", 0)),
                live=mount_problem(mountpoint) is None,
                updated_at=float(state.get("updated_at", 0.0)),
                counters={k: int(v) for k, v in counters.items()}
                if isinstance(counters, dict)
                else {},
                local=read_marker(mountpoint) is not None,
                background=str(state.get("background", "")),
            )
        )
    return sorted(found, key=lambda s: s.mountpoint)


def cache_usage(cache_dir: str, max_bytes: int) -> CacheUsage:
    return SpanCache(cache_dir, max_bytes).usage()


def _state_files(root: Path) -> Iterator[Path]:
    # Do not descend into mounts (a lazy layer's own tree can be large, and a dead one hangs).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in filenames:
            if name.endswith(STATE_SUFFIX):
                yield Path(dirpath) / name
