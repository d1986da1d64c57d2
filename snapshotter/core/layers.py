"""The one interface the snapshot core has to lazy (remote) layers.

The core asks a RemoteLayers implementation to mount a layer at a directory; whatever fails
there (no index, bad index, registry down) raises RemoteLayerUnavailable and the core falls back
to an ordinary snapshot that containerd fills by pulling the tar. The core never imports FUSE,
HTTP or the index format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class RemoteLayerUnavailable(Exception):
    """This layer cannot be served lazily; the message says why (logged once by the core)."""


class RemoteLayers(Protocol):
    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Start mounting the layer the labels describe at mountpoint, or raise
        RemoteLayerUnavailable. May return before the mount is ready: check() waits for it."""

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Wait for a mount still starting, then raise RemoteLayerUnavailable if the mount is
        not usable (failed to start, or gone); mount() may then be tried again."""

    def unmount(self, mountpoint: str) -> None:
        """Unmount (idempotent)."""
