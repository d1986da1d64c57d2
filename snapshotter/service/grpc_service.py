"""containerd.services.snapshots.v1.Snapshots over the snapshot core: protobuf <-> core calls.

The shape follows containerd's contrib/snapshotservice: each RPC converts its request, calls the
core, and maps core errors to the gRPC codes errdefs.ToGRPC uses (the containerd client maps them
back with errdefs.FromGRPC, so the codes decide containerd's behaviour). List streams the infos in
blocks of 100 and answers an empty store with an empty stream.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from snapshotter._proto.containerd.types import mount_pb2
from snapshotter.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SnapshotError,
)
from snapshotter.core.metadata import Kind
from snapshotter.core.mounts import Mount
from snapshotter.core.snapshotter import Info, Snapshotter

log = logging.getLogger("lazysnap.service")

LIST_BLOCK_SIZE = 100  # infos per ListSnapshotsResponse, as containerd's service sends them
NAMESPACE_METADATA_KEY = "containerd-namespace"

_CODES: tuple[tuple[type[SnapshotError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
)

T = TypeVar("T")


def status_code_for(err: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _mounts_pb(mounts: Sequence[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> Any:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info_pb(info: Info) -> Any:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,  # enum value names are shared with snapshots.proto
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def _info_from_pb(info: Any) -> Info:
    kind = Kind(info.kind) if info.kind in (1, 2, 3) else Kind.COMMITTED  # as containerd's toKind
    return Info(
        name=info.name,
        parent=info.parent,
        kind=kind,
        labels=dict(info.labels),
        created_ns=info.created_at.seconds * 1_000_000_000 + info.created_at.nanos,
        updated_ns=info.updated_at.seconds * 1_000_000_000 + info.updated_at.nanos,
    )


def _namespace(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_METADATA_KEY:
            return str(value)
    return "-"


def _disk_full_hint(err: OSError) -> str:
    """What to do about a full filesystem, naming it (the path in err is on it)."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    where = f"the filesystem of {err.filename}" if err.filename else "lazysnap's root filesystem"
    return (
        f" ({where} is full: free space there; lazysnap's span cache keeps "
        "[cache] min_free_bytes / min_free_percent free on its own filesystem)"
    )


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, core: Snapshotter) -> None:
        self.core = core

    def _call(self, context: Any, what: str, fn: Callable[[], T]) -> T:
        log.debug("%s: %s", _namespace(context), what)
        try:
            return fn()
        except SnapshotError as err:
            code = status_code_for(err)
            log.debug("%s -> %s: %s", what, code.name, err)
            context.abort(code, str(err))
        except OSError as err:
            # Not a containerd error class: containerd sees Unknown with the message.
            log.error("%s failed: %s", what, err)
            context.abort(grpc.StatusCode.UNKNOWN, f"{what}: {err}{_disk_full_hint(err)}")
        raise AssertionError("unreachable: context.abort raises")

    def Prepare(self, request: Any, context: Any) -> Any:
        mounts = self._call(
            context,
            f"prepare {request.key!r} parent={request.parent!r}",
            lambda: self.core.prepare(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    def View(self, request: Any, context: Any) -> Any:
        mounts = self._call(
            context,
            f"view {request.key!r} parent={request.parent!r}",
            lambda: self.core.view(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    def Mounts(self, request: Any, context: Any) -> Any:
        mounts = self._call(
            context, f"mounts {request.key!r}", lambda: self.core.mounts(request.key)
        )
        return snapshots_pb2.MountsResponse(mounts=_mounts_pb(mounts))

    def Commit(self, request: Any, context: Any) -> Any:
        self._call(
            context,
            f"commit {request.key!r} as {request.name!r}",
            lambda: self.core.commit(request.name, request.key, dict(request.labels)),
        )
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: Any) -> Any:
        self._call(context, f"remove {request.key!r}", lambda: self.core.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: Any) -> Any:
        info = self._call(context, f"stat {request.key!r}", lambda: self.core.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info_pb(info))

    def Update(self, request: Any, context: Any) -> Any:
        paths = list(request.update_mask.paths)
        info = self._call(
            context,
            f"update {request.info.name!r} paths={paths}",
            lambda: self.core.update(_info_from_pb(request.info), paths),
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=_info_pb(info))

    def List(self, request: Any, context: Any) -> Iterator[Any]:
        filters = list(request.filters)
        infos = self._call(context, f"list filters={filters}", lambda: self.core.list(filters))
        for start in range(0, len(infos), LIST_BLOCK_SIZE):
            block = infos[start : start + LIST_BLOCK_SIZE]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info_pb(i) for i in block])

    def Usage(self, request: Any, context: Any) -> Any:
        usage = self._call(context, f"usage {request.key!r}", lambda: self.core.usage(request.key))
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: Any) -> Any:
        self._call(context, "cleanup", self.core.cleanup)
        return empty_pb2.Empty()


def add_to_server(core: Snapshotter, server: Any) -> SnapshotsService:
    service = SnapshotsService(core)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    return service
