"""The CRI image-service proxy (`[cri] image_service_socket`): kubelet's image service, in front
of containerd's.

kubelet (`--image-service-endpoint`) or crictl (`--image-endpoint`) talk to this socket; every
`runtime.v1.ImageService` call (and kubelet's older `runtime.v1alpha2` one) is forwarded to
containerd's CRI socket as the bytes that came, and containerd's answer - message, status code,
details, trailing metadata - goes back as it came. The deadline travels with the call, and a
call the client cancels is cancelled upstream.

Only a PullImage request is decoded (proto/cri: the CRI subset), to keep its `auth` (the image's
pull secret) in memory for that image's registry host and repository (remote/
session_credentials.py), before containerd starts the pull whose Prepare calls discovery then
serves. The credentials are never logged: log lines say which image and what kind of
credential, never a value.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from snapshotter._proto.cri.runtime.v1 import pull_pb2
from snapshotter.remote.errors import InvalidReference
from snapshotter.remote.hosts import normalize_host
from snapshotter.remote.reference import Reference
from snapshotter.remote.session_credentials import PullAuth, PullAuthError, SessionCredentials

log = logging.getLogger("lazysnap.cri")

IMAGE_SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
PULL_IMAGE = "PullImage"
MAX_MESSAGE_BYTES = 16 << 20  # kubelet's CRI message limit (ListImages of a large node)
NO_DEADLINE_S = 1e9
WORKERS = 16  # concurrent calls: a PullImage may take minutes while ImageStatus calls go on
# Metadata a gRPC stack sets itself: forwarding it would duplicate or contradict the upstream's.
_OWN_METADATA = ("user-agent", "grpc-", ":")

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class KeptCredentials:
    """Where the credentials of one PullImage were kept (no secret)."""

    host: str
    repository: str
    kind: str


def pull_credentials(request: bytes) -> tuple[KeptCredentials, PullAuth] | None:
    """The image's (host, repository) and its `auth`, from a PullImageRequest's bytes; None
    when it carries none or cannot be read (containerd then answers the request itself).
    A `server_address` naming another registry than the image's is not used (as containerd
    does): those credentials are for that registry."""
    try:
        message = pull_pb2.PullImageRequest.FromString(request)
    except DecodeError:
        return None
    if not message.HasField("auth"):
        return None
    given = message.auth
    try:
        ref = Reference.parse(message.image.image)
        auth = PullAuth.from_cri(
            username=given.username,
            password=given.password,
            auth=given.auth,
            identity_token=given.identity_token,
            registry_token=given.registry_token,
        )
    except (InvalidReference, PullAuthError) as exc:
        log.warning("CRI PullImage of %r: credentials not kept: %s", message.image.image, exc)
        return None
    if auth is None:
        return None
    host = normalize_host(ref.registry)
    if given.server_address and normalize_host(given.server_address) != host:
        log.warning(
            "CRI PullImage of %s: its credentials name registry %s, not %s: not kept",
            message.image.image,
            normalize_host(given.server_address),
            host,
        )
        return None
    return KeptCredentials(host, ref.name, auth.kind), auth


class ImageServiceProxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Forwards every ImageService method to upstream, raw; remembers PullImage credentials."""

    def __init__(self, upstream: grpc.Channel, credentials: SessionCredentials | None) -> None:
        self._upstream = upstream
        self._credentials = credentials

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        service, _, name = method.lstrip("/").rpartition("/")
        if service not in IMAGE_SERVICES:
            return None  # UNIMPLEMENTED, as containerd answers a service it does not have
        forward = self._upstream.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        remember = self._remember if name == PULL_IMAGE else None
        return grpc.unary_unary_rpc_method_handler(_forwarder(forward, remember))

    def _remember(self, request: bytes) -> None:
        if self._credentials is None:
            return
        found = pull_credentials(request)
        if found is None:
            return
        kept, auth = found
        self._credentials.put(kept.host, kept.repository, auth)
        log.info(
            "CRI PullImage of %s/%s: its pull credentials (%s) kept in memory for this repository",
            kept.host,
            kept.repository,
            kept.kind,
        )


def _forwarder(
    forward: grpc.UnaryUnaryMultiCallable[bytes, bytes], remember: Callable[[bytes], None] | None
) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        if remember is not None:
            remember(request)
        remaining: float | None = context.time_remaining()
        if remaining is not None and remaining > NO_DEADLINE_S:
            remaining = None  # the client set none: grpc reports ~292 years
        call: Any = forward.future(
            request,
            timeout=remaining,
            metadata=_passed_on(context.invocation_metadata()),
        )
        context.add_callback(call.cancel)  # the client gave up: so does the upstream call
        try:
            response: bytes = call.result()
        except grpc.RpcError as err:
            upstream: Any = err
            context.set_trailing_metadata(_passed_on(upstream.trailing_metadata()))
            context.abort(upstream.code(), upstream.details() or "")
        context.set_trailing_metadata(_passed_on(call.trailing_metadata()))
        return response

    return handle


def _passed_on(metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in metadata or () if not k.startswith(_OWN_METADATA))


class CriProxy:
    """The proxy's gRPC server on a unix socket (mode 0660, like the snapshots socket)."""

    def __init__(self, socket_path: str, upstream_socket: str, credentials: SessionCredentials):
        self.socket_path = socket_path
        self.upstream_socket = upstream_socket
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.insecure_channel(f"unix://{upstream_socket}", options=options)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cri-proxy"),
            handlers=[ImageServiceProxy(self._channel, credentials)],
            options=options,
        )

    def start(self) -> None:
        """Listen; raises OSError naming the socket if that is not possible."""
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o711, exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a stale socket of an earlier run (the root lock is ours)
        old_umask = os.umask(0o117)
        try:
            bound = self._server.add_insecure_port(f"unix://{self.socket_path}")
        except RuntimeError as err:
            raise OSError(f"cannot listen on {self.socket_path}: {err}") from None
        finally:
            os.umask(old_umask)
        if not bound:
            raise OSError(f"cannot listen on {self.socket_path}")
        self._server.start()
        os.chmod(self.socket_path, 0o660)
        log.info("CRI image service on %s, forwarded to %s", self.socket_path, self.upstream_socket)

    def stop(self, grace: float) -> None:
        self._server.stop(grace).wait()
        self._channel.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
