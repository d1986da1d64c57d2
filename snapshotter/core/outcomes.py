"""What the core tells an observer about each Prepare it answered (the daemon's metrics count
them), so that nobody has to watch the core from outside to learn it.

A Prepare that succeeds ends one of three ways: an ordinary snapshot (no lazy layer asked for,
or this daemon serves none), a fallback (a lazy layer was asked for and is pulled whole; the
reason says why) or a lazy layer (its mount started; whether it becomes live the observer asks
the RemoteLayers). A Prepare that fails, or finds its target already there, ends none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from snapshotter.core.layers import FallbackReason


class PrepareOutcome(StrEnum):
    ORDINARY = "ordinary"
    FALLBACK = "fallback"
    LAZY = "lazy"  # answered lazily: the mount may still be starting


@dataclass(frozen=True)
class PreparedLayer:
    """The Prepare an outcome is about."""

    key: str
    labels: Mapping[str, str] = field(default_factory=dict)
    mountpoint: str = ""  # LAZY: where the layer is mounted (RemoteLayers.check's argument)


class PrepareObserver(Protocol):
    def __call__(
        self, layer: PreparedLayer, outcome: PrepareOutcome, reason: FallbackReason | None
    ) -> None:
        """Called once per successful Prepare, on its thread, after its snapshot is committed;
        reason is set for FALLBACK only. Must not block: the Prepare waits for it."""
