"""A proxy snapshotter that "mounts every layer lazily": on a Prepare that names a target
(`containerd.io/snapshot.ref`) it records a committed snapshot for it and answers ALREADY_EXISTS,
exactly the answer lazysnap gives for an indexed layer. It holds no data.

It exists so the client's lazy path is tested against containerd's real metadata layer (which
then Walks the backend for the target) independently of the FUSE/index machinery; the real
daemon's lazy path is tested beside it once it can mount layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from snapshotter._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from snapshotter._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from snapshotter.vocabulary.labels import TARGET_REF


@dataclass
class LazyFake(pb_grpc.SnapshotsServicer):
    snapshots: dict[str, pb.Info] = field(default_factory=dict)
    prepared_targets: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Prepare(
        self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        target = request.labels.get(TARGET_REF, "")
        if not target:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake only serves lazy layers")
        with self.lock:
            self.prepared_targets.append(target)
            name = f"lazy {target} on {request.parent}"
            self.snapshots[name] = pb.Info(
                name=name, parent=request.parent, kind=pb.COMMITTED, labels=dict(request.labels)
            )
        context.abort(grpc.StatusCode.ALREADY_EXISTS, f"target snapshot {target!r}: exists")
        raise AssertionError("unreachable")

    def Stat(
        self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.StatSnapshotResponse:
        with self.lock:
            info = self.snapshots.get(request.key)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.key} not found")
        return pb.StatSnapshotResponse(info=info)

    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        with self.lock:
            infos = list(self.snapshots.values())
        # containerd re-checks the filter on what a backend returns, so returning all is valid.
        yield pb.ListSnapshotsResponse(info=infos)

    def Remove(
        self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        with self.lock:
            self.snapshots.pop(request.key, None)
        return empty_pb2.Empty()

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        return pb.UsageResponse(size=0, inodes=0)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()


def serve_lazy_fake(socket: Path) -> tuple[grpc.Server, LazyFake]:
    fake = LazyFake()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SnapshotsServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    return server, fake
