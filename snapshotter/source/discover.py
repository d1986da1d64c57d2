"""Find the lazysnap index of the layer a Prepare call names, through the registry.

labels -> (image, platform manifest, layer) -> referrers of the manifest with our artifactType
(referrers API, else the sha256-<hex> tag fallback) -> the artifact blob annotated with this
layer's digest -> decoded and validated index -> a LayerSpec the FUSE layer can mount.

Every failure raises RemoteLayerUnavailable with the reason, and the core falls back to a full
pull of that layer. Results are cached per manifest digest, so the N layers of one image cost one
referrers lookup; "no index" is cached only briefly so an index pushed a moment later is seen.

A pull Prepares an image's layers one after another, each waiting for its index to be fetched
and decoded, and the first one waits for the whole lookup: every sequential registry round trip
there delays the first mount. So the lookup fetches the image manifest beside the referrers list
and all listed artifact manifests at once; then it starts fetching and decoding every layer's
index and the startup profile at once, in the background, and each layer's Prepare takes its
(usually finished) result.

Trust (snapshotter/trust, docs/trust.md): in the default `signed` mode an artifact contributes
index blobs and its profile only once one of its cosign signatures verified against a
configured key. The signatures of every listed artifact are looked up beside the artifact
manifests; once those are in, the index blobs they list are fetched ahead while the signatures
are still being checked (blobs are content-addressed: a blob fetched for an artifact that then
fails verification is simply never used, as only verified artifacts' blobs are looked up).
The newest verified artifact wins per layer; a layer only unverified artifacts cover falls
back with reason untrusted_index and a message naming the artifact and why.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.index.codec import decode_index
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE, LayerIndex
from snapshotter.index.pack import LayerPack
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.profile.model import (
    MAX_PROFILE_BYTES,
    ProfileError,
    StartupProfile,
    decode_profile,
)
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import AuthenticationError, CredentialsError, RegistryError
from snapshotter.remote.manifest import Descriptor, Manifest
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import find_referrers
from snapshotter.remote.signatures import SignatureBlob, find_signatures
from snapshotter.source.labels import LabelError, LayerRequest, parse_layer_request
from snapshotter.trust.policy import TrustPolicy
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    IndexedLayer,
    ProfileBlob,
    artifact_contents,
    newest_profile,
)

log = logging.getLogger("lazysnap.discover")

# Index blobs fetched ahead of their Prepare are held in memory until it comes (or they expire).
MAX_AHEAD_BYTES = 64 << 20
# Enough that the index blobs of a typical image (up to ~8 layers) and its startup profile all
# go out at once: each one queued behind another costs the first Prepare a round trip.
AHEAD_WORKERS = 10
# The image manifest beside its referrers lookup, then every artifact manifest that lists.
LOOKUP_WORKERS = 6
# Artifacts whose signatures are looked up, the newest listed: each costs a few round trips.
# More unsigned artifacts pushed after a signed one can only make its layers fall back.
MAX_VERIFIED_ARTIFACTS = 16
# The image config (for the layers' diffIDs, which the completion check hashes against).
MAX_CONFIG_BYTES = 4 << 20
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
AUTH_REFUSED = "registry refused the credentials we have"


@dataclass(frozen=True)
class _ImageIndexes:
    """What one platform manifest's lookup found."""

    layers: dict[str, Descriptor]  # image layer digest -> its descriptor in the image manifest
    index_blobs: dict[str, IndexedLayer]  # image layer digest -> its index blob
    source: str  # referrers-api | tag-fallback | oras
    found_at: float
    profile: ProfileBlob | None = None  # the newest startup profile blob of any artifact
    # image layer digest -> why the artifacts indexing it are not trusted (none of them is)
    untrusted: dict[str, str] = field(default_factory=dict)
    # image layer digest -> its diffID (rootfs.diff_ids of the image config, fetched beside
    # the artifact manifests); {} when the config could not be read (logged)
    diff_ids: Future[dict[str, str]] | None = None
    artifacts: dict[str, str] | None = None  # image layer digest -> its index's artifact


class IndexDiscovery:
    def __init__(
        self,
        client: RegistryClient,
        access: RegistryAccess,
        *,
        trust: TrustPolicy,
        min_layer_size: int = 0,
        negative_ttl: float = 30.0,
        positive_ttl: float = 600.0,
        refusals: RefusalLedger | None = None,
    ) -> None:
        self.client = client
        self.access = access  # how mount processes reach the registry: as the daemon does
        self.trust = trust
        self.min_layer_size = min_layer_size
        self.negative_ttl = negative_ttl
        self.positive_ttl = positive_ttl
        self.refusals = refusals  # index blobs that failed this node's completion check
        self._cache: dict[str, _ImageIndexes] = {}
        # By blob digest: the profile's fetch + decode, started ahead or by the first Prepare
        # that needs it; None when unusable (logged once, by the fetch).
        self._profiles: dict[str, Future[_ProfileFetch]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # "<repository>@<index blob digest>" -> (when, its fetch + decode running ahead)
        self._ahead: dict[str, tuple[float, Future[tuple[bytes, LayerIndex]]]] = {}
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._lookup_pool: ThreadPoolExecutor | None = None

    def __call__(self, labels: Mapping[str, str]) -> LayerSpec:
        try:
            request = parse_layer_request(labels)
        except LabelError as exc:
            raise RemoteLayerUnavailable(str(exc), FallbackReason.LABELS) from None
        try:
            return self.resolve(request)
        except RemoteLayerUnavailable:
            raise
        except (RegistryError, IndexFormatError, ValueError, OSError) as exc:
            reason = _reason_of(exc)
            # The class in words: `lazysnap pull`, status and the log say it, not only "auth".
            why = f"{AUTH_REFUSED}: {exc}" if reason is FallbackReason.AUTH else str(exc)
            raise RemoteLayerUnavailable(f"layer {request.layer_digest}: {why}", reason) from exc

    def resolve(self, request: LayerRequest) -> LayerSpec:
        if request.layer_size is not None:  # known from the labels: no registry request
            self._check_size(request.layer_digest, request.layer_size)
        ref = Reference.parse(request.image_ref)
        manifest_digest = request.manifest_digest or self._platform_manifest_digest(ref)
        found = self._indexes_for(ref, manifest_digest)
        layer = found.layers.get(request.layer_digest)
        if layer is None:
            raise RemoteLayerUnavailable(
                f"layer {request.layer_digest} is not in manifest {manifest_digest} of {ref}",
                FallbackReason.NOT_IN_MANIFEST,
            )
        self._check_size(request.layer_digest, layer.size)
        blob = found.index_blobs.get(request.layer_digest)
        if blob is None and request.layer_digest in found.untrusted:
            raise RemoteLayerUnavailable(
                f"index not signed by a trusted key for layer {request.layer_digest} of "
                f"{ref}@{manifest_digest}: {found.untrusted[request.layer_digest]}",
                FallbackReason.UNTRUSTED_INDEX,
            )
        if blob is None:
            raise RemoteLayerUnavailable(
                f"no lazysnap index for layer {request.layer_digest}: the index artifact of "
                f"{ref}@{manifest_digest} covers {len(found.index_blobs)} other layer(s) "
                f"(looked up via {found.source}; layers under the build's min size stay unindexed)"
                if found.index_blobs
                else f"no lazysnap index for layer {request.layer_digest}: image "
                f"{ref}@{manifest_digest} has none (looked up via {found.source})",
                FallbackReason.NO_INDEX,
            )
        refused = self.refusals.refused(blob.index_digest) if self.refusals is not None else None
        if refused is not None:
            raise RemoteLayerUnavailable(
                f"index blob {blob.index_digest} for layer {request.layer_digest} failed the "
                f"completion check on this node before (refused): {refused.why}",
                reason=FallbackReason.REFUSED_INDEX,
            )
        if blob.index_size > MAX_INDEX_BLOB_SIZE:
            raise RemoteLayerUnavailable(
                f"index blob {blob.index_digest} for layer {request.layer_digest} is "
                f"{blob.index_size} bytes",
                FallbackReason.BAD_INDEX,
            )
        data, index = self._index_blob(ref, blob, request.layer_digest)
        if index.compressed_size != layer.size:
            raise RemoteLayerUnavailable(
                f"index {blob.index_digest} says layer {request.layer_digest} has "
                f"{index.compressed_size} bytes, the image manifest says {layer.size}",
                FallbackReason.BAD_INDEX,
            )
        log.debug("layer %s: index %s (%s)", request.layer_digest, blob.index_digest, found.source)
        return LayerSpec(
            blob=BlobSpec(
                kind="registry",
                location=str(ref.repository),
                digest=request.layer_digest,
                size=layer.size,
                access=self.access,
            ),
            index_bytes=data,
            prefetch_names=self._profile_names(ref, found.profile, request.layer_digest),
            pack=self._layer_pack(found.profile, request.layer_digest),
            diff_id=found.diff_ids.result().get(request.layer_digest, "") if found.diff_ids else "",
            artifact_digest=(found.artifacts or {}).get(request.layer_digest, ""),
            image=request.image_ref,
        )

    def _check_size(self, layer_digest: str, size: int) -> None:
        if size < self.min_layer_size:
            raise RemoteLayerUnavailable(
                f"layer {layer_digest} is {size} bytes, under min_layer_size "
                f"{self.min_layer_size}: pulled whole",
                FallbackReason.SMALL_LAYER,
            )

    def _index_blob(
        self, ref: Reference, blob: IndexedLayer, layer_digest: str
    ) -> tuple[bytes, LayerIndex]:
        """The index blob, fetched and decoded (checked to describe layer_digest): taken from
        the background fetch if one ran ahead, else fetched now. Errors are the same either way."""
        with self._guard:
            ahead = self._ahead.pop(f"{ref.repository}@{blob.index_digest}", None)
        if ahead is not None:
            return ahead[1].result()
        return _fetch_index(self.client, ref, blob, layer_digest)

    def _fetch_ahead(self, ref: Reference, found: _ImageIndexes) -> None:
        """Start fetching and decoding the startup profile and the index of every layer that
        will be Prepared lazily, all at once. Also with a single such layer: its index and the
        profile then overlap instead of following each other."""
        wanted = [
            (layer_digest, blob)
            for layer_digest, blob in found.index_blobs.items()
            if found.layers[layer_digest].size >= self.min_layer_size
        ]
        if not wanted:
            return  # no layer of this image is mounted lazily: its profile is not needed either
        now = time.monotonic()
        with self._guard:
            for key in [
                k for k, (when, _) in self._ahead.items() if now - when > self.positive_ttl
            ]:
                del self._ahead[key]  # never asked for (e.g. the layer was already there)
            if self._ahead_pool is None:
                self._ahead_pool = ThreadPoolExecutor(AHEAD_WORKERS, "index-ahead")
            # Every lazy layer's Prepare reads the profile: it is fetched (and kept) anyway, so
            # it is not held to MAX_AHEAD_BYTES, which bounds indexes that may never be asked for.
            profile = found.profile
            if profile is not None and self._profile_wanted(profile.digest):
                self._profiles[profile.digest] = self._ahead_pool.submit(
                    _fetch_profile, self.client, ref, profile
                )
            if sum(blob.index_size for _, blob in wanted) > MAX_AHEAD_BYTES:
                return  # too much to hold: each Prepare fetches its own
            for layer_digest, blob in wanted:
                key = f"{ref.repository}@{blob.index_digest}"
                if key not in self._ahead:
                    future = self._ahead_pool.submit(
                        _fetch_index, self.client, ref, blob, layer_digest
                    )
                    self._ahead[key] = (now, future)

    def _profile_names(
        self, ref: Reference, blob: ProfileBlob | None, layer_digest: str
    ) -> tuple[str, ...]:
        """This layer's part of the image's startup profile. A profile is only a hint: one that
        cannot be fetched or decoded is logged once and the layer mounts without it."""
        if blob is None:
            return ()
        with self._guard:
            mine = self._profile_wanted(blob.digest)
            if mine:  # not fetched ahead (or to retry): fetch it here, other Prepares wait for it
                self._profiles[blob.digest] = Future()
            pending = self._profiles[blob.digest]
        if mine:
            fetched = _ProfileFetch(None, time.monotonic())
            try:
                fetched = _fetch_profile(self.client, ref, blob)
            finally:
                pending.set_result(fetched)  # never leave the others waiting
        profile = pending.result().profile
        return profile.names_for(layer_digest) if profile is not None else ()

    def _layer_pack(self, blob: ProfileBlob | None, layer_digest: str) -> LayerPack | None:
        """This layer's section of the start-up pack the profile names (fetched by
        _profile_names just before): the profile, hence the pack's digests, came from a
        verified artifact."""
        with self._guard:
            pending = self._profiles.get(blob.digest) if blob is not None else None
        profile = pending.result().profile if pending is not None else None
        return profile.pack_for(layer_digest) if profile is not None else None

    def _profile_wanted(self, digest: str) -> bool:
        """Whether the profile blob must be fetched (now): never tried, or its fetch failed
        (the registry, not the blob) longer than negative_ttl ago. Called under _guard."""
        pending = self._profiles.get(digest)
        if pending is None:
            return True
        if not pending.done():
            return False
        failed_at = pending.result().fetch_failed_at
        return failed_at is not None and time.monotonic() - failed_at >= self.negative_ttl

    def _platform_manifest_digest(self, ref: Reference) -> str:
        top = self.client.get_manifest(ref)
        if not top.is_index:
            return top.digest
        return self.client.resolve_platform(top).digest

    def _indexes_for(self, ref: Reference, manifest_digest: str) -> _ImageIndexes:
        key = f"{ref.repository}@{manifest_digest}"
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # concurrent Prepares of one image's layers share one lookup
            cached = self._cache.get(key)
            now = time.monotonic()
            if cached is not None:
                ttl = self.positive_ttl if cached.index_blobs else self.negative_ttl
                if now - cached.found_at < ttl:
                    return cached
            found = self._lookup(ref, manifest_digest)
            self._cache[key] = found
            self._fetch_ahead(ref, found)
            return found

    def _lookup(self, ref: Reference, manifest_digest: str) -> _ImageIndexes:
        # The image manifest and its referrers are independent requests: one round trip for
        # both instead of one each (the first Prepare of every image waits for this lookup).
        with self._guard:
            if self._lookup_pool is None:
                self._lookup_pool = ThreadPoolExecutor(LOOKUP_WORKERS, "index-lookup")
            pool = self._lookup_pool
        image_future = pool.submit(self.client.get_manifest, ref.with_digest(manifest_digest))
        # The config follows the image manifest at once, overlapping the referrers lookup and
        # the artifact manifests: no round trip of its own on the way to the first mount.
        diff_ids = pool.submit(_diff_ids, self.client, ref, image_future)

        def image_layers() -> dict[str, Descriptor]:
            image = image_future.result()
            if image.is_index:
                raise RemoteLayerUnavailable(
                    f"{ref}@{manifest_digest} is an index, not a manifest",
                    FallbackReason.NOT_IN_MANIFEST,
                )
            return {d.digest: d for d in image.layers}

        try:
            result = find_referrers(self.client, ref.repository, manifest_digest, ARTIFACT_TYPE)
        except BaseException:
            image_layers()  # a bad image manifest is the error to report, as when it came first
            raise
        # Every listed artifact manifest at once (one round trip, not one per artifact), while
        # the image manifest may still be on its way; with them, each artifact's signatures.
        listed = list(result.descriptors)[-MAX_VERIFIED_ARTIFACTS:]
        artifacts = [
            pool.submit(self.client.get_manifest, ref.with_digest(desc.digest)) for desc in listed
        ]
        signatures = [
            pool.submit(_signatures_of, self.client, ref, desc.digest)
            for desc in (listed if self.trust.needs_signatures else [])
        ]
        try:
            layers = image_layers()
        except BaseException:
            for pending in artifacts + signatures:
                pending.cancel()
            raise
        fetched: list[Manifest] = []
        # Results are applied in the listed order, whichever arrived first; the first failing
        # one in that order is the error reported, as when they were fetched one by one.
        for pending in artifacts:
            try:
                fetched.append(pending.result())
            except BaseException:
                for later in artifacts + signatures:
                    later.cancel()
                raise
        # What each lists (its artifactType is what the referrers lookup asked for).
        contents = [artifact_contents(artifact) for artifact in fetched]
        if signatures:
            # Start the index blobs on their way while the signatures are checked; only those
            # of verified artifacts are ever taken (resolve looks up verified ones only).
            speculative = {
                blob.layer_digest: blob
                for holds in contents
                for blob in holds.layers
                if blob.layer_digest in layers
            }
            self._fetch_ahead(
                ref, _ImageIndexes(layers, speculative, result.source, time.monotonic())
            )
        index_blobs: dict[str, IndexedLayer] = {}
        index_artifacts: dict[str, str] = {}
        untrusted: dict[str, str] = {}
        profile: ProfileBlob | None = None
        # Newest artifact wins when several exist: referrers lists give no order, so take the
        # last one that names a layer (stable for a given registry answer).
        for number, (artifact, holds) in enumerate(zip(fetched, contents, strict=True)):
            covered = [blob for blob in holds.layers if blob.layer_digest in layers]
            if self.trust.checks_signatures:
                found = signatures[number].result() if signatures else ()
                verdict = self.trust.decide(artifact.digest, found)
                if not verdict.trusted:
                    log.warning(
                        "not using lazysnap index artifact %s of %s@%s: %s",
                        artifact.digest,
                        ref,
                        manifest_digest,
                        verdict.reason,
                    )
                    for blob in covered:
                        untrusted[blob.layer_digest] = (
                            f"artifact {artifact.digest}: {verdict.reason}"
                        )
                    continue
                log.debug("index artifact %s: %s", artifact.digest, verdict.reason)
            for blob in covered:
                index_blobs[blob.layer_digest] = blob
                index_artifacts[blob.layer_digest] = artifact.digest
            profile = newest_profile(profile, holds.profiles)
        for layer_digest in index_blobs:
            untrusted.pop(layer_digest, None)
        log.info(
            "%s@%s: lazysnap index for %d of %d layers (via %s)%s",
            ref,
            manifest_digest,
            len(index_blobs),
            len(layers),
            result.source,
            f"; {len(untrusted)} more only in untrusted artifacts" if untrusted else "",
        )
        return _ImageIndexes(
            layers,
            index_blobs,
            result.source,
            time.monotonic(),
            profile,
            untrusted,
            diff_ids,
            index_artifacts,
        )


def _signatures_of(
    client: RegistryClient, ref: Reference, artifact_digest: str
) -> tuple[SignatureBlob, ...]:
    """The artifact's signatures; a registry failure looking them up is reported as one
    unreadable signature (the artifact is then not trusted, and the log says why)."""
    try:
        return find_signatures(client, ref.repository, artifact_digest)
    except RegistryError as exc:
        return (SignatureBlob(f"signatures of {artifact_digest}", None, "", str(exc)),)


def _fetch_index(
    client: RegistryClient, ref: Reference, blob: IndexedLayer, layer_digest: str
) -> tuple[bytes, LayerIndex]:
    data = client.get_blob(ref.repository, blob.index_digest, max_size=MAX_INDEX_BLOB_SIZE)
    return data, decode_index(data, expected_layer_digest=layer_digest)


def _diff_ids(
    client: RegistryClient, ref: Reference, image_future: Future[Manifest]
) -> dict[str, str]:
    """Image layer digest -> diffID, from the image config (rootfs.diff_ids, by position);
    {} when the config cannot be read: the completion check then compares the TOC only and
    the layer stays lazy (logged here, once per lookup)."""
    try:
        image = image_future.result()
    except Exception:  # the lookup reports the image manifest's own failure
        return {}
    if image.is_index:
        return {}  # so does the lookup
    where = f"image config of {ref}@{image.digest}"
    try:
        config = image.config
        if config is None:
            raise ValueError("the image manifest has no config")
        data = client.get_blob(ref.repository, config.digest, max_size=MAX_CONFIG_BYTES)
        found = json.loads(data).get("rootfs", {}).get("diff_ids")
        if not isinstance(found, list) or not all(
            isinstance(d, str) and _SHA256.fullmatch(d) for d in found
        ):
            raise ValueError("rootfs.diff_ids is not a list of sha256 digests")
        if len(found) != len(image.layers):
            raise ValueError(f"{len(found)} diffIDs for {len(image.layers)} layers")
    except Exception as exc:  # RegistryError, JSON, shape: all mean "no diffIDs"
        log.warning("%s: %s; lazy layers of it are checked against their TOC only", where, exc)
        return {}
    return {layer.digest: diff_id for layer, diff_id in zip(image.layers, found, strict=True)}


@dataclass(frozen=True)
class _ProfileFetch:
    profile: StartupProfile | None  # None: unusable, logged
    # When fetching it failed (the registry's doing: tried again after negative_ttl); None when
    # it was fetched, or its bytes do not decode (a blob never changes: not tried again).
    fetch_failed_at: float | None = None


def _fetch_profile(client: RegistryClient, ref: Reference, blob: ProfileBlob) -> _ProfileFetch:
    """The startup profile blob, fetched and decoded. A profile is only a hint: nothing about
    it may make a layer fail, so any error ends here, logged."""
    where = f"startup profile {blob.digest} of {ref}"
    try:
        data = client.get_blob(ref.repository, blob.digest, MAX_PROFILE_BYTES)
    except Exception as exc:  # RegistryError, or e.g. an OSError under the HTTP client
        detail = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
        log.warning("ignoring %s for now (tried again later): %s", where, detail)
        return _ProfileFetch(None, time.monotonic())
    try:
        return _ProfileFetch(decode_profile(data, where))
    except ProfileError as exc:
        log.warning("ignoring startup profile: %s", exc)
    except Exception as exc:  # a decoder bug must not fail the layer either
        log.warning("ignoring %s: %s: %s", where, type(exc).__name__, exc)
    return _ProfileFetch(None)


def _reason_of(exc: BaseException) -> FallbackReason:
    """The class of an error that ended a layer's discovery."""
    if isinstance(exc, AuthenticationError | CredentialsError):
        return FallbackReason.AUTH
    if isinstance(exc, RegistryError):
        return FallbackReason.REGISTRY
    if isinstance(exc, IndexFormatError):
        return FallbackReason.BAD_INDEX
    return FallbackReason.OTHER
