"""One pull, as data: what `lazysnap pull` asks for, run here (in the CLI's process) or by
`lazysnap serve` for the CLI (snapshotter/service/pull_server.py). Both run execute()."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snapshotter.pull.outcome import PullSummary
    from snapshotter.pull.puller import Progress, WhyNotLazy


class RequestError(ValueError):
    """A pull request that cannot be run as it stands (names the field)."""


@dataclass(frozen=True)
class PullRequest:
    image: str
    address: str  # containerd's socket
    namespace: str
    snapshotter: str
    platform: str | None = None  # os/arch[/variant]; None: the machine's
    plain_http: bool = False
    hosts_dir: str | None = None
    # The caller's docker config.json (credentials): a daemon pulling for a client reads the
    # client's, not its own. None: the default of whoever runs the pull.
    docker_config: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> PullRequest:
        if not isinstance(obj, dict):
            raise RequestError("a pull request is a JSON object")
        strings = ("image", "address", "namespace", "snapshotter")
        for key in strings:
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise RequestError(f"pull request: {key!r} must be a non-empty string")
        for key in ("platform", "hosts_dir", "docker_config"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise RequestError(f"pull request: {key!r} must be a string or null")
        if not isinstance(obj.get("plain_http", False), bool):
            raise RequestError("pull request: 'plain_http' must be true or false")
        unknown = set(obj) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RequestError(f"pull request: unknown keys {sorted(unknown)}")
        return cls(**obj)


def failure_message(request: PullRequest, exc: BaseException) -> str | None:
    """What to tell the user about exc ending the pull, or None for an exception that is a bug
    (the caller lets it propagate)."""
    from snapshotter.pull.plan import ImageFormatError
    from snapshotter.pull.resolve import PullError
    from snapshotter.remote.errors import RegistryError

    if isinstance(exc, (PullError, ImageFormatError)):
        return str(exc)
    if isinstance(exc, ValueError):  # a bad reference, platform or hosts.toml: names it
        return str(exc)
    if isinstance(exc, RegistryError):
        message = str(exc)  # names the image once, whether or not the registry client did
        if not message.startswith(request.image):
            message = f"{request.image}: {message}"
        return f"pulling {message}"
    # Not imported for this check (it loads grpc): an exception of it means it is loaded.
    containerd_api = sys.modules.get("snapshotter.pull.containerd_api")
    if containerd_api is not None and isinstance(exc, containerd_api.ContainerdError):
        return f"pulling {request.image}: {exc}"
    return None


def execute(
    request: PullRequest, progress: Progress, why_not_lazy: WhyNotLazy | None = None
) -> PullSummary:
    """Run the pull here; why_not_lazy looks up the snapshotter's reason for each layer it did
    not mount lazily (progress.layer_done gets it). Raises ValueError (bad reference or
    platform), PullError, ImageFormatError, RegistryError or ContainerdError, each naming what
    failed.

    The manifest and config requests go out on a thread of their own while grpc and the
    containerd client load (~0.1 s either way, when this is a fresh process): they are
    independent until the first snapshot call."""
    import threading
    from concurrent.futures import Future

    from snapshotter.pull.resolve import ResolvedImage, resolve_image
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.remote.manifest import Platform
    from snapshotter.remote.reference import Reference

    ref = Reference.parse(request.image)
    platform = Platform.parse(request.platform) if request.platform else Platform.host()
    access = RegistryAccess.create(
        hosts_dir=request.hosts_dir,
        plain_http=(ref.registry,) if request.plain_http else (),
        docker_config=request.docker_config,
    )
    with access.client() as registry:
        resolving: Future[ResolvedImage] = Future()

        def resolve() -> None:
            try:
                resolving.set_result(resolve_image(registry, request.image, platform))
            except BaseException as exc:  # handed to whoever asks for the result
                resolving.set_exception(exc)

        # A daemon thread, not a pool's: a pull that fails on containerd's side returns at once
        # instead of waiting for a slow registry (a pool's thread would be joined at exit).
        threading.Thread(target=resolve, name="resolve", daemon=True).start()
        from snapshotter.pull.containerd_api import ContainerdClient
        from snapshotter.pull.puller import Puller, PullOptions

        with ContainerdClient(request.address, request.namespace) as containerd:
            containerd.connect()
            options = PullOptions(snapshotter=request.snapshotter, platform=platform)
            puller = Puller(containerd, registry, options, progress, why_not_lazy)
            return puller.unpack(resolving.result())
