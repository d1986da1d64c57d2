"""Questions the fs tests ask of a LazyLayers that the daemon never asks: answered from the
files beside the mountpoint and the kernel (as `lazysnap status` does), or by running the
materializer's steps for one layer at once instead of waiting for its watcher."""

from __future__ import annotations

from snapshotter import sidecars
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.mount_checks import mount_problem


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
