"""Questions the fs tests ask of a LazyLayers that the daemon never asks: answered from the
files beside the mountpoint and the kernel (as `lazysnap status` does), or by running the
materializer's steps for one layer at once instead of waiting for its watcher; and moving the
watcher on with a ManualClock (the LazyLayers' clock) instead of sleeping through its polls."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from snapshotter import sidecars
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.materializer import MATERIALIZE_POLL_S
from snapshotter.lazylayers.mount_checks import mount_problem
from tests.fs.manual_clock import ManualClock

# Real seconds a watcher pass may take: a completion check or a copy runs in a helper process.
PASS_TIMEOUT_S = 60.0


def is_local(mountpoint: str) -> bool:
    """The layer was copied into plain files (its FUSE mount detached)."""
    return sidecars.read_marker(mountpoint) is not None


def is_live(mountpoint: str) -> bool:
    """The layer is served: local, or mounted with its mount process alive."""
    return is_local(mountpoint) or mount_problem(mountpoint) is None


def known_mountpoints(manager: LazyLayers) -> set[str]:
    """Every mountpoint the manager watches or holds a mount process for (to clean up)."""
    return {*manager.materializer.watched(), *manager.supervisor.mountpoints()}


def materialize_now(manager: LazyLayers, mountpoint: str) -> bool:
    """Check and copy the layer at mountpoint into plain files now, whatever its background
    state, as the watcher does once the layer is complete; True if it is local afterwards."""
    if is_local(mountpoint):
        return True
    materializer = manager.materializer
    digest = (sidecars.read_state(mountpoint) or {}).get("layer_digest")
    layer_digest = digest if isinstance(digest, str) else ""
    verdict = sidecars.read_verdict(mountpoint) or materializer._verify(mountpoint, layer_digest)
    if verdict is None or not materializer._may_materialize(mountpoint, verdict):
        return False
    return materializer._materialize(mountpoint, layer_digest)


def background_complete(mountpoint: str | os.PathLike[str]) -> bool:
    """The mount process says every span is cached (its state file, refreshed every 2 s)."""
    return (sidecars.read_state(str(mountpoint)) or {}).get("background") == "complete"


def watcher_passes(clock: ManualClock, count: int, seconds: float = MATERIALIZE_POLL_S) -> None:
    """Let the materializer's watcher (the one thread waiting on clock) make count passes over
    its layers, seconds of clock apart; returns once the last one is over."""
    for _ in range(count):
        clock.wait_for_blocked(1, timeout=PASS_TIMEOUT_S)  # its last pass is over
        clock.advance(seconds)
    clock.wait_for_blocked(1, timeout=PASS_TIMEOUT_S)


def until_watcher(condition: Callable[[], bool], clock: ManualClock, seconds: float = 30) -> bool:
    """Move the watcher on, a poll interval at a time, until condition holds; False if it
    does not within seconds of real time."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        watcher_passes(clock, 1)
    return True
