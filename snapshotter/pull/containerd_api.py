"""The slice of containerd's gRPC API a pull needs: content, images, leases, snapshots, diff.

Every call carries the namespace (and, inside `lease()`, the lease) as gRPC metadata, exactly
like containerd's Go client does. gRPC status codes become the small exception family below so
the pull logic never looks at grpc objects, and every message names the socket or object.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from snapshotter._proto.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from snapshotter._proto.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter._proto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from snapshotter._proto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from snapshotter._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from snapshotter._proto.containerd.types import descriptor_pb2, mount_pb2

CONNECT_TIMEOUT_S = 5.0
# containerd accepts 16 MiB messages; 1 MiB chunks keep memory flat and progress smooth.
WRITE_CHUNK = 1 << 20
# A lease that outlives a crashed pull must not pin content forever (ctr uses 24h too).
LEASE_EXPIRY = datetime.timedelta(hours=24)

T = TypeVar("T")


class ContainerdError(Exception):
    """A containerd call failed; the message says which call and on what."""


class ContainerdUnreachable(ContainerdError):
    pass


class NotFound(ContainerdError):
    pass


class AlreadyExists(ContainerdError):
    pass


class Descriptor(Protocol):
    """What containerd's types.Descriptor carries (remote.manifest.Descriptor fits)."""

    @property
    def media_type(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def annotations(self) -> Mapping[str, str]: ...


def descriptor_proto(desc: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=desc.media_type,
        digest=desc.digest,
        size=desc.size,
        annotations=dict(desc.annotations),
    )


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: int
    labels: Mapping[str, str]


class ContainerdClient:
    """One connection to containerd's socket, bound to one namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._lease_id = ""
        self._channel = grpc.insecure_channel(
            f"unix://{os.path.abspath(address)}",
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        self._content = content_pb2_grpc.ContentStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = images_pb2_grpc.ImagesStub(self._channel)  # type: ignore[no-untyped-call]
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)  # type: ignore[no-untyped-call]
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)  # type: ignore[no-untyped-call]
        self._diff = diff_pb2_grpc.DiffStub(self._channel)  # type: ignore[no-untyped-call]

    # -- connection -------------------------------------------------------------------------

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Fail early with a clear message instead of on the first real call."""
        if not os.path.exists(self.address):
            raise ContainerdUnreachable(
                f"cannot reach containerd at {self.address}: no such socket "
                "(is containerd running? pass --address)"
            )
        if not self._answers(timeout_s):
            raise ContainerdUnreachable(
                f"cannot reach containerd at {self.address}: no answer within {timeout_s:g}s"
            )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self._lease_id:
            md.append(("containerd-lease", self._lease_id))
        return md

    def _call(self, what: str, fn: Callable[..., T], request: Any) -> T:
        try:
            return fn(request, metadata=self._metadata())
        except grpc.RpcError as err:
            raise self._translate(what, err) from None

    def _translate(self, what: str, err: grpc.RpcError) -> ContainerdError:
        code = err.code() if isinstance(err, grpc.Call) else None
        detail = err.details() if isinstance(err, grpc.Call) else str(err)
        message = f"{what}: {detail}"
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(message)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExists(message)
        if code == grpc.StatusCode.UNAVAILABLE and not self._answers():
            return ContainerdUnreachable(f"cannot reach containerd at {self.address}: {message}")
        # UNAVAILABLE from a containerd that answers comes from behind it: typically a proxy
        # snapshotter whose socket nobody listens on.
        return ContainerdError(message)

    def _answers(self, timeout_s: float = 1.0) -> bool:
        # A real (cheap) call rather than channel_ready_future, whose helper thread can die
        # noisily at interpreter exit.
        try:
            self._leases.List(
                leases_pb2.ListRequest(),
                metadata=self._metadata(),
                timeout=timeout_s,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            return False
        return True

    # -- leases -----------------------------------------------------------------------------

    @contextmanager
    def lease(self) -> Iterator[str]:
        """Hold everything written inside the block until its GC roots (image record, labels)
        are in place, then drop the lease so GC can reclaim only what nothing references."""
        lease_id = f"lazysnap-pull-{secrets.token_hex(8)}"
        self._call(
            "create lease",
            self._leases.Create,
            leases_pb2.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": _expiry()}),
        )
        self._lease_id = lease_id
        try:
            yield lease_id
        finally:
            self._lease_id = ""
            # It expires on its own; never mask the pull's own outcome.
            with suppress(ContainerdError):
                self._call(
                    f"delete lease {lease_id}",
                    self._leases.Delete,
                    leases_pb2.DeleteRequest(id=lease_id),
                )

    # -- content ----------------------------------------------------------------------------

    def content_info(self, digest: str) -> ContentInfo | None:
        try:
            resp = self._call(
                f"content info {digest}", self._content.Info, content_pb2.InfoRequest(digest=digest)
            )
        except NotFound:
            return None
        return ContentInfo(resp.info.digest, resp.info.size, dict(resp.info.labels))

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        if not labels:
            return
        self._call(
            f"label content {digest}",
            self._content.Update,
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=digest, labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
            ),
        )

    def write_content(
        self,
        ref: str,
        desc: Descriptor,
        chunks: Iterable[bytes],
        labels: Mapping[str, str],
    ) -> bool:
        """Stream a blob into the content store and commit it under desc.digest with labels.

        Returns False (nothing written) when the store already holds the digest; the writer
        open still adds it to the current lease, as in containerd's content.WriteBlob."""

        # gRPC drains the request iterator on its own thread and turns an exception there into
        # a bare CANCELLED; keep the source's own error (e.g. a registry failure) to re-raise.
        source_errors: list[Exception] = []

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            # First message opens (and locks) the ingest; containerd checks expected here.
            yield content_pb2.WriteContentRequest(
                action=content_pb2.STAT, ref=ref, total=desc.size, expected=desc.digest
            )
            offset = 0
            try:
                for chunk in chunks:
                    for start in range(0, len(chunk), WRITE_CHUNK):
                        piece = chunk[start : start + WRITE_CHUNK]
                        yield content_pb2.WriteContentRequest(
                            action=content_pb2.WRITE, offset=offset, data=piece
                        )
                        offset += len(piece)
            except Exception as err:
                source_errors.append(err)
                raise
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                total=desc.size,
                offset=offset,
                expected=desc.digest,
                labels=dict(labels),
            )

        what = f"write {desc.digest} to the content store"
        last: content_pb2.WriteContentResponse | None = None
        try:
            for resp in self._content.Write(requests(), metadata=self._metadata()):
                last = resp
        except grpc.RpcError as err:
            translated = self._translate(what, err)
            if isinstance(translated, AlreadyExists):
                return False
            self._abort(ref)
            if source_errors:
                raise source_errors[0] from None
            raise translated from None
        if last is None or last.action != content_pb2.COMMIT or last.digest != desc.digest:
            self._abort(ref)
            raise ContainerdError(f"{what}: containerd did not confirm the commit")
        return True

    def _abort(self, ref: str) -> None:
        with suppress(ContainerdError):  # nothing to abort, or gone already
            self._call(
                f"abort ingest {ref}", self._content.Abort, content_pb2.AbortRequest(ref=ref)
            )

    # -- snapshots --------------------------------------------------------------------------

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        try:
            resp = self._call(
                f"stat snapshot {key} ({snapshotter})",
                self._snapshots.Stat,
                snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
            )
        except NotFound:
            return None
        info = resp.info
        return SnapshotInfo(info.name, info.parent, int(info.kind), dict(info.labels))

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[mount_pb2.Mount]:
        resp = self._call(
            f"prepare snapshot {key!r} on snapshotter {snapshotter}",
            self._snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
            ),
        )
        return list(resp.mounts)

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None:
        self._call(
            f"commit snapshot {key!r} as {name} on snapshotter {snapshotter}",
            self._snapshots.Commit,
            snapshots_pb2.CommitSnapshotRequest(
                snapshotter=snapshotter, name=name, key=key, labels=dict(labels)
            ),
        )

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._call(
            f"remove snapshot {key!r} on snapshotter {snapshotter}",
            self._snapshots.Remove,
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
        )

    # -- diff -------------------------------------------------------------------------------

    def apply_layer(self, desc: Descriptor, mounts: list[mount_pb2.Mount]) -> str:
        """Unpack the layer blob (already in the content store) into mounts; returns the
        digest of the uncompressed tar, which the caller checks against the diff ID."""
        resp = self._call(
            f"apply layer {desc.digest}",
            self._diff.Apply,
            diff_pb2.ApplyRequest(diff=descriptor_proto(desc), mounts=mounts),
        )
        return str(resp.applied.digest)

    # -- images -----------------------------------------------------------------------------

    def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str]) -> None:
        """Create the image record, or point the existing one at target (containerd's
        createNewImage: Create, on ALREADY_EXISTS Update)."""
        image = images_pb2.Image(name=name, target=descriptor_proto(target), labels=dict(labels))
        try:
            self._call(
                f"create image {name}",
                self._images.Create,
                images_pb2.CreateImageRequest(image=image),
            )
            return
        except AlreadyExists:
            pass
        self._call(
            f"update image {name}",
            self._images.Update,
            images_pb2.UpdateImageRequest(
                image=image,
                update_mask=field_mask_pb2.FieldMask(
                    paths=["target", *(f"labels.{k}" for k in labels)]
                ),
            ),
        )


def _expiry() -> str:
    return (datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
