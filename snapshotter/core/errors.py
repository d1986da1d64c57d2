"""Errors of the snapshot core, one class per containerd errdefs class the service maps to gRPC.

The containerd client turns the gRPC code back into errdefs (errdefs.FromGRPC), so the class a
core operation raises decides what containerd does next: e.g. AlreadyExists on Prepare tells the
unpacker that a remote snapshot already holds the layer.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class; the message names the snapshot key, label or filter concerned."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass
