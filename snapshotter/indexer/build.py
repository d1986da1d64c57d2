"""`lazysnap index build`: index an image's layers and attach the indexes as an OCI referrer.

For each selected platform manifest:
1. If a lazysnap artifact already refers to it and covers every layer >= --min-layer-size,
   nothing is done (idempotent rebuilds push nothing).
2. Each layer >= --min-layer-size is reused from the first cache repository holding a usable
   index of it for this span size (layer_cache: no byte of the layer is read) or streamed once
   from the registry (one Range GET over the data plane) into build_layer_index in a worker
   process (layer_worker; no copy on disk), up to --jobs at a time, largest first. Smaller
   layers stay unindexed: pulled whole.
3. Only when every layer of every selected platform is indexed, the pushes start: new indexes
   to the image repository, reused ones mounted into it, the empty config `{}` (side by side),
   then one artifact manifest per platform manifest via push_referrer (which maintains the
   `sha256-<hex>` tag index on registries without the referrers API), and meanwhile the new
   indexes to the cache repositories (each one that lets us push).

A layer that cannot be indexed (its bytes do not match its digest, a hostile or corrupt tar,
an unsupported media type, the registry fails) fails the whole build with an error naming the
image and the layer, and nothing is pushed: a partial artifact would make the snapshotter
believe the missing layers are meant to be pulled whole.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from snapshotter.index.model import (
    DEFAULT_FILE_CUT_MIN,
    DEFAULT_MIN_LAYER_SIZE,
    DEFAULT_SPAN_SIZE,
    FORMAT_VERSION,
    FORMAT_VERSION_EXTERNAL_WINDOWS,
)
from snapshotter.indexer import layer_cache, signing
from snapshotter.indexer.artifact import EMPTY_CONFIG, artifact_manifest
from snapshotter.indexer.cache_entry import VariantKey
from snapshotter.indexer.layer_worker import LayerWorkers
from snapshotter.indexer.platforms import select_platforms
from snapshotter.indexer.progress import BuildProgress
from snapshotter.indexer.static_source import (
    BuiltIndex,
    StaticProfileResult,
    attach_static_profile,
)
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import ManifestNotFound, PlatformNotFound, RegistryError
from snapshotter.remote.manifest import (
    EMPTY_JSON,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    sha256_digest,
)
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import ReferrerSource, find_referrers, push_referrer
from snapshotter.trust.keys import SigningKey
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    ArtifactError,
    IndexedLayer,
    indexed_layers,
)

log = logging.getLogger(__name__)

# Layer media types the index builder understands (OCI and Docker, incl. non-distributable).
INDEXABLE_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)


PARALLEL_UPLOADS = 4  # blobs pushed to the image repository at once, at least


class IndexBuildError(Exception):
    """The build failed; the message names the image, platform, layer or registry. Nothing of
    this build was pushed."""


@dataclass(frozen=True)
class BuildOptions:
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    span_size: int = DEFAULT_SPAN_SIZE
    file_cut_min: int = DEFAULT_FILE_CUT_MIN  # build_layer_index's file-aware span cuts
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    # Looked up after the image's own namespace's cache, before the registry-wide one.
    cache_repos: tuple[str, ...] = ()
    shared_cache: bool = True  # also the registry-wide cache (layer_cache.cache_repositories)
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Sign every artifact (and layer cache entry) pushed; reuse only what this key signed.
    sign_key: SigningKey | None = None
    # Attach a static start-up profile to each new artifact (indexer/static_profile.py).
    static_profile: bool = True


class LayerOutcome(StrEnum):
    BUILT = "built"  # read from the registry and indexed now
    REUSED = "reused"  # taken from the layer cache, layer bytes not read
    PRESENT = "present"  # already in this image's artifact
    SMALL = "small"  # below --min-layer-size: stays unindexed (pulled whole)
    UNSUPPORTED = "unsupported"  # media type the index format cannot describe


@dataclass(frozen=True)
class LayerResult:
    layer: Descriptor
    outcome: LayerOutcome
    indexed: IndexedLayer | None = None
    index_blob: bytes | None = None  # BUILT only: pushed after every layer succeeded
    windows_blob: bytes = b""  # BUILT only: the version-2 index's windows (b"": none)
    bytes_read: int = 0
    variant: VariantKey | None = None  # BUILT and REUSED: span size and format version
    cached_in: Repository | None = None  # REUSED only: the cache repository it came from


@dataclass(frozen=True)
class Target:
    """One platform manifest to attach an artifact to."""

    platform: str  # "linux/amd64", or "-" for an image that is a single manifest
    subject: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class TargetResult:
    target: Target
    artifact_digest: str | None  # None: no layer large enough, nothing to attach
    pushed: bool  # False when an equivalent artifact was already there
    source: ReferrerSource | None
    signature_digest: str | None = None  # the signature pushed now (None: none, or one was there)
    static_profile: str = ""  # the static start-up profile attached now ("": none)


@dataclass
class BuildReport:
    image: str
    targets: list[TargetResult] = field(default_factory=list)
    layers: dict[str, LayerResult] = field(default_factory=dict)
    skipped_platforms: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_stored: dict[str, int] = field(default_factory=dict)  # cache repository -> indexes

    def count(self, outcome: LayerOutcome) -> int:
        return sum(1 for r in self.layers.values() if r.outcome == outcome)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.layers.values())

    def cache_summary(self) -> str | None:
        """Which cache repositories reused indexes came from and new ones went to, or None."""
        reused: dict[str, int] = {}
        for result in self.layers.values():
            if result.outcome is LayerOutcome.REUSED and result.cached_in is not None:
                reused[str(result.cached_in)] = reused.get(str(result.cached_in), 0) + 1
        parts = [f"{n} reused from {cache}" for cache, n in reused.items()]
        parts += [f"{n} stored in {cache}" for cache, n in self.cache_stored.items()]
        return f"index cache: {', '.join(parts)}" if parts else None

    def summary(self) -> str:
        built = self.count(LayerOutcome.BUILT)
        skipped = self.count(LayerOutcome.SMALL) + self.count(LayerOutcome.UNSUPPORTED)
        return (
            f"{self.image}: {built} layer{'' if built == 1 else 's'} indexed, "
            f"{self.count(LayerOutcome.REUSED)} reused, "
            f"{self.count(LayerOutcome.PRESENT)} already indexed, "
            f"{skipped} skipped (small or unsupported), {self.bytes_read} bytes read, "
            f"{self.seconds:.1f} s"
        )


def resolve_targets(
    client: RegistryClient, ref: Reference, options: BuildOptions
) -> tuple[list[Target], list[str]]:
    """The platform manifests to index, and warnings about absent children of a sparse index
    that were not explicitly asked for."""
    top = client.get_manifest(ref)
    if not top.is_index:
        for want in options.platforms:  # each one asked for must be the image's
            client.check_manifest_platform(top, want)
        return [_target("-", top)], []
    choices = select_platforms(top, options.platforms, all_platforms=options.all_platforms)
    targets: list[Target] = []
    skipped: list[str] = []
    for choice in choices:
        child_ref = ref.with_digest(choice.descriptor.digest)
        try:
            child = client.get_manifest(child_ref)
        except ManifestNotFound:
            if choice.required:
                raise PlatformNotFound(
                    f"{ref}: the manifest {choice.descriptor.digest} for platform "
                    f"{choice.label} is absent from the registry (sparse index)"
                ) from None
            skipped.append(
                f"{ref}: skipping platform {choice.label}: its manifest "
                f"{choice.descriptor.digest} is absent (sparse index)"
            )
            continue
        if child.is_index:
            skipped.append(f"{ref}: skipping nested index {child.digest} ({choice.label})")
            continue
        targets.append(_target(choice.label, child))
    return targets, skipped


def _target(label: str, manifest: Manifest) -> Target:
    subject = Descriptor(manifest.media_type, manifest.digest, len(manifest.data))
    return Target(label, subject, tuple(manifest.layers))


def wanted_layers(target: Target, options: BuildOptions) -> list[Descriptor]:
    """The layers of target to index, in image order, each digest once."""
    wanted: dict[str, Descriptor] = {}
    for layer in target.layers:
        if layer.size >= options.min_layer_size and layer.media_type in INDEXABLE_MEDIA_TYPES:
            wanted.setdefault(layer.digest, layer)
    return list(wanted.values())


def existing_artifact(
    client: RegistryClient, repo: Repository, target: Target, options: BuildOptions
) -> tuple[str, ReferrerSource, list[IndexedLayer]] | None:
    """A lazysnap artifact already referring to target that indexes every wanted layer (when
    signing: and that options.sign_key signed; an unsigned one may be anyone's forgery)."""
    found = find_referrers(client, repo, target.subject.digest, ARTIFACT_TYPE)
    wanted = {layer.digest for layer in wanted_layers(target, options)}
    for desc in reversed(found.descriptors):  # later entries are the newer pushes
        try:
            manifest = client.get_manifest(Reference(repo.registry, repo.name, digest=desc.digest))
            layers = indexed_layers(manifest)
        except (ArtifactError, ManifestNotFound) as exc:
            log.warning("ignoring referrer %s of %s: %s", desc.digest, target.subject.digest, exc)
            continue
        if not wanted <= {layer.layer_digest for layer in layers}:
            continue
        if options.sign_key is not None and not signing.signed_by(
            client, repo, desc.digest, options.sign_key
        ):
            log.info(
                "artifact %s of %s is not signed by this key: not reusing it", desc.digest, repo
            )
            continue
        return desc.digest, found.source, layers
    return None


def _index_one(
    client: RegistryClient,
    repo: Repository,
    caches: Sequence[Repository],
    layer: Descriptor,
    options: BuildOptions,
    progress: BuildProgress,
    workers: LayerWorkers,
) -> LayerResult:
    hit = layer_cache.lookup(client, caches, layer.digest, options.span_size, options.sign_key)
    if hit is not None:
        progress.skip(layer.size)
        return LayerResult(
            layer, LayerOutcome.REUSED, hit.indexed, variant=hit.key, cached_in=hit.repository
        )
    bar = progress.layer(layer.digest, layer.size)
    try:
        # One Range GET of the whole layer over the urllib3 data plane (a fraction of httpx's
        # CPU per byte); it checks the size, and the builder hashes every byte and checks the
        # digest: an unverified layer is never indexed.
        with BlobReader(client, repo, layer.digest, layer.size) as reader:
            encoded = workers.build(
                lambda sink: reader.stream(0, layer.size, sink),
                media_type=layer.media_type,
                span_size=options.span_size,
                file_cut_min=options.file_cut_min,
                digest=layer.digest,
                size=layer.size,
                progress=bar.update,
            )
    finally:
        bar.close()
    # Version 2 for gzip layers: the windows (most of a v1 index) go into their own blob, so
    # a mount fetches only the small index blob before it can serve, and windows with spans.
    blob, windows = encoded.index_blob, encoded.windows_blob
    indexed = IndexedLayer(
        layer.digest,
        sha256_digest(blob),
        len(blob),
        sha256_digest(windows) if windows else "",
        len(windows),
    )
    # encode_index_split: version 2 exactly when there is a windows blob.
    version = FORMAT_VERSION_EXTERNAL_WINDOWS if windows else FORMAT_VERSION
    return LayerResult(
        layer,
        LayerOutcome.BUILT,
        indexed,
        blob,
        windows,
        bar.bytes_read,
        variant=VariantKey(options.span_size, version),
    )


def _index_layers(
    client: RegistryClient,
    repo: Repository,
    caches: Sequence[Repository],
    layers: Sequence[Descriptor],
    options: BuildOptions,
) -> dict[str, LayerResult]:
    """Index (or reuse) every layer, in parallel; IndexBuildError naming each failed layer."""
    results: dict[str, LayerResult] = {}
    failures: list[str] = []
    with (
        BuildProgress(sum(layer.size for layer in layers)) as progress,
        LayerWorkers() as workers,  # closed after the pool: no build is running then
        concurrent.futures.ThreadPoolExecutor(max(1, options.jobs)) as pool,
    ):
        # Largest first: the largest layer is the critical path, and it must not wait for a
        # worker while smaller ones (which fill the other workers meanwhile) go first.
        by_size = sorted(layers, key=lambda layer: layer.size, reverse=True)
        workers.start(min(len(layers), max(1, options.jobs)))
        futures = {
            pool.submit(_index_one, client, repo, caches, layer, options, progress, workers): layer
            for layer in by_size
        }
        for future in concurrent.futures.as_completed(futures):
            layer = futures[future]
            try:
                results[layer.digest] = future.result()
            except Exception as exc:  # any failure of one layer fails the image
                failures.append(f"layer {layer.digest} ({layer.size} bytes): {_describe(exc)}")
                for other in futures:
                    other.cancel()  # stop what has not started: nothing will be pushed
    if failures:
        raise IndexBuildError("\n  ".join(["cannot index:", *sorted(failures)]))
    return results


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if isinstance(exc, RegistryError) and text else f"{type(exc).__name__}: {text}"


def _push_image_blobs(
    client: RegistryClient,
    repo: Repository,
    results: dict[str, LayerResult],
    jobs: int,
) -> None:
    """Everything the artifact manifests name into the image repository, side by side: new
    index (and windows) blobs, reused ones mounted from their cache, the empty config `{}`."""
    uploads: list[tuple[bytes, str]] = [(EMPTY_JSON, EMPTY_CONFIG.digest)]
    adoptions: list[tuple[Repository, IndexedLayer]] = []
    for result in results.values():
        if result.indexed is None:
            continue
        if result.outcome is LayerOutcome.BUILT and result.index_blob is not None:
            uploads.append((result.index_blob, result.indexed.index_digest))
            if result.indexed.windows_digest:
                uploads.append((result.windows_blob, result.indexed.windows_digest))
        elif result.outcome is LayerOutcome.REUSED and result.cached_in is not None:
            adoptions.append((result.cached_in, result.indexed))
    # Round trips, not CPU: more at once than --jobs (registries take parallel uploads).
    with concurrent.futures.ThreadPoolExecutor(max(jobs, PARALLEL_UPLOADS)) as pool:
        done = [pool.submit(client.push_blob, repo, data, digest) for data, digest in uploads]
        done += [pool.submit(layer_cache.adopt, client, c, repo, i) for c, i in adoptions]
        for future in done:
            future.result()  # the first failure fails the image, as in series


def _publish_to_caches(
    client: RegistryClient,
    caches: Sequence[Repository],
    results: dict[str, LayerResult],
    sign_key: SigningKey | None,
) -> dict[str, int]:
    """Store the new indexes in the cache repositories, a few layers at once (never fails the
    image); how many new ones each cache repository took."""
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_UPLOADS) as pool:
        pending = [
            pool.submit(
                layer_cache.publish,
                client,
                caches,
                result.indexed,
                result.variant,
                result.index_blob,
                result.windows_blob,
                sign_key,
            )
            for result in results.values()
            if result.outcome is LayerOutcome.BUILT
            and result.indexed is not None
            and result.index_blob is not None
            and result.variant is not None
        ]
        published = [future.result() for future in pending]
    layer_cache.report_refusals(published)
    taken: dict[str, int] = {}
    for done in published:
        for cache in done.stored:
            taken[str(cache)] = taken.get(str(cache), 0) + 1
    return taken


def _attach_static(
    client: RegistryClient, repo: Repository, target: Target, indexes: dict[str, BuiltIndex]
) -> StaticProfileResult | None:
    try:
        return attach_static_profile(client, repo, target.subject, indexes)
    except Exception:  # a hint: whatever went wrong, the artifact goes without one
        log.exception("%s@%s: no static start-up profile", repo, target.subject.digest)
        return None


def _static_profiles(
    client: RegistryClient,
    repo: Repository,
    targets: Sequence[Target],
    built: dict[str, LayerResult],
) -> concurrent.futures.Future[list[StaticProfileResult | None]]:
    """Each target's static profile, on a thread of its own: it reads the layers while the
    indexes are pushed (a reused index is read from the cache repository it came from)."""
    indexes = {
        digest: BuiltIndex(
            result.indexed,
            result.index_blob,
            result.windows_blob or None,
            result.cached_in or repo,
        )
        for digest, result in built.items()
        if result.indexed is not None
    }

    def attach_all() -> list[StaticProfileResult | None]:
        return [_attach_static(client, repo, target, indexes) for target in targets]

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(attach_all)
    finally:
        pool.shutdown(wait=False)


def build_image_index(
    client: RegistryClient, image: str, options: BuildOptions = BuildOptions()
) -> BuildReport:
    """Index IMAGE and push its artifacts. Raises IndexBuildError or RegistryError."""
    started = time.monotonic()
    ref = Reference.parse(image)
    repo = ref.repository
    caches = layer_cache.cache_repositories(repo, options.cache_repos, shared=options.shared_cache)
    if options.file_cut_min != DEFAULT_FILE_CUT_MIN:
        # a cache variant states span size and format, not the span layout: neither reuse one
        # cut otherwise nor leave this one for builds with the default layout
        caches = ()
    report = BuildReport(str(ref))
    targets, report.skipped_platforms = resolve_targets(client, ref, options)
    for warning in report.skipped_platforms:
        log.warning("%s", warning)

    todo: list[Target] = []
    pending: dict[str, Descriptor] = {}
    for target in targets:
        wanted = {layer.digest for layer in wanted_layers(target, options)}
        for layer in target.layers:
            if layer.digest not in wanted:
                outcome = (
                    LayerOutcome.SMALL
                    if layer.media_type in INDEXABLE_MEDIA_TYPES
                    else LayerOutcome.UNSUPPORTED
                )
                report.layers.setdefault(layer.digest, LayerResult(layer, outcome))
        if not wanted:
            report.targets.append(TargetResult(target, None, False, None))
            continue
        existing = existing_artifact(client, repo, target, options)
        if existing is not None:
            digest, source, indexed = existing
            by_layer = {i.layer_digest: i for i in indexed}
            for layer in target.layers:
                if layer.digest in wanted:
                    report.layers.setdefault(
                        layer.digest,
                        LayerResult(layer, LayerOutcome.PRESENT, by_layer[layer.digest]),
                    )
            report.targets.append(TargetResult(target, digest, False, source))
            continue
        todo.append(target)
        for layer in target.layers:
            if layer.digest in wanted:
                pending.setdefault(layer.digest, layer)

    built = _index_layers(client, repo, caches, list(pending.values()), options) if todo else {}
    report.layers.update(built)
    if not todo:
        report.seconds = time.monotonic() - started
        return report
    # The static profiles read the layers on a thread of their own while the indexes go up.
    statics = _static_profiles(client, repo, todo, built) if options.static_profile else None
    _push_image_blobs(client, repo, built, options.jobs)
    static_results = statics.result() if statics is not None else [None] * len(todo)
    # The cache entries and each platform's artifact (its own subject, its own tag index) go in
    # side by side: on a registry without the referrers API, push_referrer waits 0.3-0.6 s to
    # see that no concurrent push dropped its tag index entry.
    with concurrent.futures.ThreadPoolExecutor(1 + min(len(todo), max(1, options.jobs))) as pool:
        cache_stored = pool.submit(_publish_to_caches, client, caches, built, options.sign_key)
        artifacts = [
            pool.submit(_push_artifact, client, repo, target, built, options, static)
            for target, static in zip(todo, static_results, strict=True)
        ]
        report.targets += [artifact.result() for artifact in artifacts]
        report.cache_stored = cache_stored.result()
    report.seconds = time.monotonic() - started
    return report


def _push_artifact(
    client: RegistryClient,
    repo: Repository,
    target: Target,
    built: dict[str, LayerResult],
    options: BuildOptions,
    static: StaticProfileResult | None,
) -> TargetResult:
    """Push (and with options.sign_key sign) target's artifact manifest, with its static
    start-up profile when there is one."""
    layers = [
        built[layer.digest].indexed
        for layer in wanted_layers(target, options)
        if built[layer.digest].indexed is not None
    ]
    manifest = artifact_manifest(
        target.subject,
        [i for i in layers if i is not None],
        [static.blob.blob()] if static is not None else (),
    )
    pushed = push_referrer(client, repo, manifest)
    signature = None
    if options.sign_key is not None:
        artifact = Descriptor(OCI_MANIFEST, pushed.digest, len(manifest))
        signature = signing.sign_manifest(client, repo, artifact, options.sign_key)
    return TargetResult(
        target,
        pushed.digest,
        True,
        pushed.source,
        signature,
        static.summary() if static is not None else "",
    )
