"""Index one pushed image: what a worker of the acceleration service does with a job.

1. GET the pushed manifest by digest. lazysnap's own artifacts (artifactType = the index
   artifact type), other artifacts (signatures, SBOMs, charts: an artifactType or a config
   that is not an image config) and indexes that list no platform manifest (referrers
   indexes) are IGNORED: indexing them would fail, and indexing our own pushes would loop.
2. build_image_index on `registry/repo@digest`, every platform of an index. It is idempotent:
   an image whose artifact already covers every layer pushes nothing (ALREADY_INDEXED).
3. Failures are sorted into transient (the registry is unreachable or answers 5xx: retried
   by the queue) and permanent (a layer that is not what its media type says, a missing
   manifest, refused credentials: failed with the reason).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from snapshotter.accel.events import PushedImage
from snapshotter.accel.record import Outcome
from snapshotter.index.model import DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from snapshotter.indexer.build import (
    BuildOptions,
    BuildReport,
    IndexBuildError,
    LayerOutcome,
    build_image_index,
)
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.errors import (
    BlobFetchError,
    ManifestNotFound,
    ReferrerPushError,
    RegistryError,
    RegistryUnavailable,
    UnexpectedResponse,
)
from snapshotter.remote.manifest import Manifest
from snapshotter.remote.reference import Reference
from snapshotter.trust.keys import SigningKey
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE

log = logging.getLogger("lazysnap.accel")

OWN_ARTIFACT = "lazysnap index artifact"
IMAGE_CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)


@dataclass(frozen=True)
class WorkerOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    layer_jobs: int = 1  # layers of one image indexed in parallel
    cache_repos: tuple[str, ...] = ()  # BuildOptions.cache_repos
    shared_cache: bool = True
    sign_key: SigningKey | None = None  # sign every artifact pushed (BuildOptions.sign_key)
    static_profile: bool = True  # BuildOptions.static_profile


@dataclass(frozen=True)
class JobResult:
    outcome: Outcome
    detail: str
    artifacts: tuple[str, ...] = ()
    own: bool = False  # IGNORED because lazysnap pushed it
    # What the build did, for the service's metrics (zero when nothing was built).
    build_seconds: float = 0.0
    bytes_read: int = 0
    layers_built: int = 0
    layers_reused: int = 0


class JobFailed(Exception):
    """The attempt failed; transient failures are worth retrying."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class RegistryClients:
    """One RegistryClient per registry host (plain http only where asked), shared by workers:
    keeps connections and bearer tokens across jobs."""

    def __init__(
        self, access: RegistryAccess, credentials: CredentialStore, *, plain_http: bool
    ) -> None:
        self._access = access
        self._credentials = credentials  # one store: helper answers are shared by all clients
        self._plain_http = plain_http
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def for_registry(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                access = (
                    self._access.with_plain_http(registry) if self._plain_http else self._access
                )
                client = access.client(self._credentials)
                self._clients[registry] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def not_an_image(manifest: Manifest) -> str | None:
    """Why a pushed manifest or index is not a container image to index, or None."""
    kind = manifest.json().get("artifactType")
    if kind == ARTIFACT_TYPE:
        return OWN_ARTIFACT
    if kind:
        return f"artifact (artifactType {kind}), not a container image"
    if manifest.is_index:
        children = manifest.manifests
        if not any(child.platform is not None for child in children):
            return "index lists no platform manifest (referrers or artifact index)"
        return None
    config = manifest.config
    if config is None:
        return "manifest has no config"
    if config.media_type == ARTIFACT_TYPE:
        return OWN_ARTIFACT
    if config.media_type not in IMAGE_CONFIG_TYPES:
        return f"config mediaType {config.media_type}, not a container image"
    return None


def is_transient(exc: RegistryError) -> bool:
    if isinstance(exc, RegistryUnavailable | BlobFetchError | ReferrerPushError):
        return True
    return isinstance(exc, UnexpectedResponse) and (exc.status or 0) >= 500


def index_pushed_image(
    clients: RegistryClients, image: PushedImage, options: WorkerOptions
) -> JobResult:
    """Index one pushed image. Raises JobFailed (with transient set) when it cannot."""
    client = clients.for_registry(image.registry)
    ref = Reference.parse(image.reference)
    try:
        manifest = client.get_manifest(ref)
        reason = not_an_image(manifest)
    except ManifestNotFound as exc:
        raise JobFailed(f"manifest gone from the registry: {exc}", transient=False) from None
    except RegistryError as exc:
        raise JobFailed(str(exc), transient=is_transient(exc)) from None
    if reason is not None:
        return JobResult(Outcome.IGNORED, reason, own=reason == OWN_ARTIFACT)

    build = BuildOptions(
        all_platforms=True,
        span_size=options.span_size,
        min_layer_size=options.min_layer_size,
        cache_repos=options.cache_repos,
        shared_cache=options.shared_cache,
        jobs=options.layer_jobs,
        sign_key=options.sign_key,
        static_profile=options.static_profile,
    )
    try:
        report = build_image_index(client, image.reference, build)
    except IndexBuildError as exc:
        # A layer failed. If the registry itself is unreachable now, that was the cause: try
        # again later; otherwise the layer is bad and retrying cannot help.
        raise JobFailed(str(exc), transient=_registry_down(client, ref)) from None
    except RegistryError as exc:
        raise JobFailed(str(exc), transient=is_transient(exc)) from None
    return _result(report)


def _registry_down(client: RegistryClient, ref: Reference) -> bool:
    try:
        client.get_manifest(ref)
    except RegistryError as exc:
        return is_transient(exc)
    return False


def _result(report: BuildReport) -> JobResult:
    pushed = tuple(t.artifact_digest for t in report.targets if t.pushed and t.artifact_digest)
    present = tuple(t.artifact_digest for t in report.targets if not t.pushed and t.artifact_digest)
    built = report.count(LayerOutcome.BUILT)
    reused = report.count(LayerOutcome.REUSED)
    platforms = len(report.targets)
    summary = (
        f"{platforms} platform{'' if platforms == 1 else 's'}, "
        f"{built} layer{'' if built == 1 else 's'} indexed, {reused} reused, "
        f"{report.bytes_read} bytes read, {report.seconds:.1f} s"
    )

    def result(outcome: Outcome, detail: str, artifacts: tuple[str, ...] = ()) -> JobResult:
        return JobResult(
            outcome,
            detail,
            artifacts,
            build_seconds=report.seconds,
            bytes_read=report.bytes_read,
            layers_built=built,
            layers_reused=reused,
        )

    if pushed:
        return result(Outcome.INDEXED, summary, pushed + present)
    if present:
        return result(Outcome.ALREADY_INDEXED, f"artifact {', '.join(present)}", present)
    return result(
        Outcome.NOTHING_TO_INDEX,
        f"no layer of an indexable type is >= --min-layer-size ({summary})",
    )
