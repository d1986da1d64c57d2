"""The one interface the snapshot core has to lazy (remote) layers.

The core asks a RemoteLayers implementation to mount a layer at a directory; whatever fails
there (no index, bad index, registry down) raises RemoteLayerUnavailable and the core falls back
to an ordinary snapshot that containerd fills by pulling the tar. The core never imports FUSE,
HTTP or the index format.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Protocol


class FallbackReason(StrEnum):
    """Why a layer was not served lazily: a short, stable class (a metric label value, the
    `reason` in `lazysnap status` and `lazysnap pull`); the exception's message has the detail."""

    DISABLED = "disabled"  # no resolver configured
    LABELS = "labels"  # the Prepare labels name no image or layer
    SMALL_LAYER = "small_layer"  # under min_layer_size: pulled whole on purpose
    NO_INDEX = "no_index"  # the registry has no lazysnap index for this layer
    NOT_IN_MANIFEST = "not_in_manifest"
    BAD_INDEX = "bad_index"  # an index exists but is malformed or describes another layer
    UNTRUSTED_INDEX = "untrusted_index"  # not signed by a key the node trusts
    REFUSED_INDEX = "refused_index"  # failed this node's completion check before
    AUTH = "auth"  # the registry refused the credentials we have
    REGISTRY = "registry"  # the registry failed, is unreachable, or TLS/plain-HTTP mismatch
    RESOLVER = "resolver"
    MOUNT = "mount"  # the mount process failed
    OTHER = "other"
    INTERNAL_ERROR = "internal_error"  # a bug in the lazy path: not a RemoteLayerUnavailable


class RemoteLayerUnavailable(Exception):
    """This layer cannot be served lazily; the message says why (logged once by the core),
    `reason` classifies it: whoever raises it knows the cause, so it sets the reason (metrics,
    `lazysnap status` and `lazysnap pull` read it as it is)."""

    def __init__(self, message: str, reason: FallbackReason = FallbackReason.OTHER) -> None:
        super().__init__(message)
        self.reason = reason


class RemoteLayers(Protocol):
    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Start mounting the layer the labels describe at mountpoint, or raise
        RemoteLayerUnavailable. May return before the mount is ready: check() waits for it."""

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Wait for a mount still starting, then raise RemoteLayerUnavailable if the mount is
        not usable (failed to start, or gone); mount() may then be tried again."""

    def unmount(self, mountpoint: str) -> None:
        """Unmount (idempotent)."""
