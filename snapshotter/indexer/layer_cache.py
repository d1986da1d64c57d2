"""Layer-level reuse of indexes across a registry: every configured cache repository.

An index depends only on the layer's bytes, and base layers are shared by many images, so every
built index is also stored per layer in cache repositories (cache_repositories), looked up in
this order, first usable hit wins:

1. `<first path component of the image repo>/lazysnap-index-cache` (`team/app` ->
   `team/lazysnap-index-cache`; `lazysnap-index-cache` for a single-component repository):
   registries grant write permission per namespace (Harbor projects, Docker Hub users), so
   the image's own namespace is where the builder can most likely push;
2. each `--cache-repo`, in the order given;
3. unless switched off (`--no-shared-cache`), the registry-wide `lazysnap-index-cache`: what
   lets `other/app` reuse the base layers `team/app` indexed.

A new index is stored in each of them the builder may push to: a 401/403 (or any registry
error) on one is logged and the next one tried; the image's own artifact never depends on it.

In each repository the entry is the tag `layer-sha256-<hex of the layer digest>`; its root is a
variant manifest or an OCI index of variants (cache_entry: span size, index format version).
A build uses only a variant of its own span size and of a format version it reads; storing a
variant keeps the entry's shape unless a second variant turns a manifest into an index.

On a hit the builder never reads the layer: it cross-repo mounts the index blob and its windows
blob into the image repository (or, when the registry refuses the mount, copies them with GET +
PUT). A variant for another layer (mistagged, hostile), one that cannot be read, or one whose
blobs are gone is ignored with a warning; the next variant, then the next cache repository is
tried, and when none is usable the layer is indexed from its bytes. The same checks run on a
variant whether it is the entry's root or one listed by an index.

A build that signs (`--sign-key`) signs each variant manifest it stores, and reuses only
variants that carry a valid signature by its own key (the signature is on the variant
manifest, in the cache repository; an index root is not signed, it only points at variants):
anyone who can push to a cache repository could otherwise put a forged index there for the
builder to adopt and sign. A variant without that signature is ignored (logged) and the layer
indexed from its bytes; the variant is then stored again, signed, so the next build reuses it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

from snapshotter.index.codec import MAX_WINDOWS_BLOB, decode_index
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.indexer import signing
from snapshotter.indexer.artifact import EMPTY_CONFIG
from snapshotter.indexer.cache_entry import (
    CacheEntry,
    CacheEntryError,
    Shape,
    Variant,
    VariantKey,
    parse_entry,
    updated_root,
    variant_descriptor,
    variant_manifest,
)
from snapshotter.remote.auth import PUSH, repository_scope
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import (
    AuthenticationError,
    ManifestNotFound,
    NotFoundError,
    RegistryError,
    UnexpectedResponse,
)
from snapshotter.remote.manifest import (
    EMPTY_JSON,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    sha256_digest,
)
from snapshotter.remote.reference import Reference, Repository
from snapshotter.trust.keys import SigningKey
from snapshotter.vocabulary.artifact import (
    LAYER_DIGEST_ANNOTATION,
    ArtifactError,
    IndexedLayer,
    cached_index_for,
)

log = logging.getLogger(__name__)

CACHE_REPO_NAME = "lazysnap-index-cache"
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
_ROOT_WRITE_ATTEMPTS = 3  # a registry honouring If-Match refused a racing update: read again


class CacheNameError(ValueError):
    """A layer digest that cannot name a cache tag."""


def default_cache_repo(image_repo: str) -> str:
    head, sep, _ = image_repo.partition("/")
    return f"{head}/{CACHE_REPO_NAME}" if sep else CACHE_REPO_NAME


def cache_repositories(
    image: Repository, extra: Sequence[str] = (), *, shared: bool = True
) -> tuple[Repository, ...]:
    """The cache repositories for an image, in lookup order, each once: its own namespace's,
    then extra (--cache-repo), then the registry-wide one unless not shared."""
    names = [default_cache_repo(image.name), *extra]
    if shared:
        names.append(CACHE_REPO_NAME)
    return tuple(Repository(image.registry, name) for name in dict.fromkeys(names))


def cache_tag(layer_digest: str) -> str:
    match = _SHA256.fullmatch(layer_digest)
    if match is None:
        raise CacheNameError(f"layer digest {layer_digest!r} is not sha256:<64 hex>")
    return f"layer-sha256-{match.group(1)}"


@dataclass(frozen=True)
class CacheHit:
    """A usable variant: where it is, what it holds."""

    repository: Repository
    indexed: IndexedLayer
    key: VariantKey
    manifest_digest: str  # the variant manifest (what a signature covers)
    shape: Shape  # of the entry it was found in


@dataclass(frozen=True)
class _Rejected:
    """Why a variant is not used; warn: it is broken or untrusted (not just another span size)."""

    reason: str
    warn: bool = True


def lookup(
    client: RegistryClient,
    caches: Sequence[Repository],
    layer_digest: str,
    span_size: int,
    sign_key: SigningKey | None = None,
) -> CacheHit | None:
    """The first usable cached index of layer_digest for span_size in caches (in order), or
    None (absent or unusable everywhere: said why in the log). With sign_key: only a variant
    that key signed."""
    for cache in caches:
        hit = _lookup_in(client, cache, layer_digest, span_size, sign_key)
        if hit is not None:
            log.info(
                "layer %s: reusing its index from cache %s (%s, %s entry)",
                layer_digest,
                cache,
                hit.key,
                hit.shape,
            )
            return hit
    return None


def _lookup_in(
    client: RegistryClient,
    cache: Repository,
    layer_digest: str,
    span_size: int,
    sign_key: SigningKey | None,
) -> CacheHit | None:
    ref = Reference(cache.registry, cache.name, tag=cache_tag(layer_digest), tag_given=True)
    try:
        entry = _read_entry(client, ref)
    except CacheEntryError as exc:
        log.warning("ignoring layer index cache entry %s: %s", ref, exc)
        return None
    except AuthenticationError as exc:
        log.info("layer index cache %s not readable with these credentials: %s", cache, exc)
        return None
    except RegistryError as exc:
        log.warning("layer index cache %s unreadable, trying the next: %s", ref, exc)
        return None
    if entry is None:
        return None
    candidates = entry.candidates(span_size)
    if not candidates:
        log.info(
            "layer index cache entry %s has no variant for span size %d (it has: %s)",
            ref,
            span_size,
            "; ".join(entry.keys()),
        )
    for variant in candidates:
        try:
            manifest = _variant_manifest(client, cache, entry, variant)
            found = _usable(client, cache, manifest, layer_digest, span_size, sign_key)
        except RegistryError as exc:
            found = _Rejected(f"unreadable: {exc}")
        if isinstance(found, _Rejected):
            where = str(ref)
            if entry.shape == "index":
                where += f" variant {variant.descriptor.digest}"
            (log.warning if found.warn else log.info)(
                "not using layer index cache entry %s: %s", where, found.reason
            )
            continue
        indexed, key = found
        return CacheHit(cache, indexed, key, manifest.digest, entry.shape)
    return None


def _read_entry(client: RegistryClient, ref: Reference) -> CacheEntry | None:
    """The entry under ref's tag, None when there is none. CacheEntryError: neither shape."""
    try:
        root = client.get_manifest(ref)
    except ManifestNotFound:
        return None
    return parse_entry(root)


def _variant_manifest(
    client: RegistryClient, cache: Repository, entry: CacheEntry, variant: Variant
) -> Manifest:
    if entry.shape == "manifest":
        return entry.root
    ref = Reference(cache.registry, cache.name, digest=variant.descriptor.digest)
    return client.get_manifest(ref)


def _usable(
    client: RegistryClient,
    cache: Repository,
    manifest: Manifest,
    layer_digest: str,
    span_size: int,
    sign_key: SigningKey | None,
) -> tuple[IndexedLayer, VariantKey] | _Rejected:
    """The index a variant manifest holds for layer_digest, if a build asking span_size (and
    signing with sign_key) may use it. Every variant gets these checks, the entry's root or
    one an index lists, cheapest first: it must index this layer (not a mistagged or hostile
    entry), have a fitting key, carry sign_key's signature, and still have its blobs."""
    try:
        indexed = cached_index_for(manifest, layer_digest)
    except ArtifactError as exc:
        return _Rejected(str(exc))
    key = VariantKey.from_annotations(manifest.annotations)
    if key is not None and (problem := key.problem(span_size)) is not None:
        return _Rejected(problem, warn=False)
    if sign_key is not None and not signing.signed_by(client, cache, manifest.digest, sign_key):
        return _Rejected(
            f"not signed by key {sign_key.public.key_id} (indexing the layer itself, then "
            "storing and signing its index)"
        )
    if key is None:
        learned = _key_from_index_blob(client, cache, indexed)
        if isinstance(learned, _Rejected):
            return learned
        if (problem := learned.problem(span_size)) is not None:
            return _Rejected(problem, warn=False)
        key = learned
    # A variant whose blobs are gone (a registry cleaned by hand, a broken mirror) would fail
    # the whole build when adopted: index the layer itself instead.
    for kind, digest in (("index", indexed.index_digest), ("windows", indexed.windows_digest)):
        if digest and not client.blob_exists(cache, digest):
            return _Rejected(f"its {kind} blob {digest} is missing")
    return indexed, key


def _key_of(
    client: RegistryClient, cache: Repository, manifest: Manifest, layer_digest: str
) -> VariantKey | _Rejected:
    """The key of a variant manifest of layer_digest: the one it states, or (written before
    keys were stated) the one its index blob says."""
    try:
        indexed = cached_index_for(manifest, layer_digest)
    except ArtifactError as exc:
        return _Rejected(str(exc))
    key = VariantKey.from_annotations(manifest.annotations)
    return key if key is not None else _key_from_index_blob(client, cache, indexed)


def _key_from_index_blob(
    client: RegistryClient, cache: Repository, indexed: IndexedLayer
) -> VariantKey | _Rejected:
    """Span size and format version from the index blob itself, which must describe the
    layer (decode_index checks every field and the layer digest it names)."""
    try:
        data = client.get_blob(cache, indexed.index_digest, MAX_INDEX_BLOB_SIZE)
    except NotFoundError:
        return _Rejected(f"its index blob {indexed.index_digest} is missing")
    try:
        index = decode_index(data, expected_layer_digest=indexed.layer_digest)
    except IndexFormatError as exc:
        return _Rejected(f"its index blob {indexed.index_digest}: {exc}")
    return VariantKey(index.span_size, index.version)


def adopt(
    client: RegistryClient, cache: Repository, target: Repository, indexed: IndexedLayer
) -> str:
    """Make the cached index blob and its windows blob present in target; says how:
    "present", "mounted" or "copied" (GET from the cache + PUT, when the registry refuses the
    cross-repo mount), the last way any of them took."""
    how = _adopt_blob(client, cache, target, indexed.index_digest, MAX_INDEX_BLOB_SIZE)
    if indexed.windows_digest:
        windows = _adopt_blob(client, cache, target, indexed.windows_digest, MAX_WINDOWS_BLOB)
        how = max(how, windows, key=_ADOPT_ORDER.index)
    return how


_ADOPT_ORDER = ("present", "mounted", "copied")


def _adopt_blob(
    client: RegistryClient, cache: Repository, target: Repository, digest: str, max_size: int
) -> str:
    if cache == target or client.blob_exists(target, digest):
        return "present"
    if cache.registry == target.registry and _mount(client, cache, target, digest):
        return "mounted"
    data = client.get_blob(cache, digest, max_size)
    client.push_blob(target, data, digest)
    return "copied"


def _mount(client: RegistryClient, source: Repository, target: Repository, digest: str) -> bool:
    """Cross-repo mount (POST ...?mount=&from=). True on 201; on 202 the registry opened an
    upload instead, which we cancel (the caller copies the bytes)."""
    try:
        response, host = client.request(
            "POST",
            target,
            f"/{target.name}/blobs/uploads/",
            capability="push",
            actions=PUSH,
            extra_scopes=[repository_scope(source.name, ("pull",))],
            params=[("mount", digest), ("from", source.name)],
        )
        with contextlib.closing(response):
            if response.status_code == 201:
                return True
            location = response.headers.get("location")
        if location:
            cancel, _ = client.request(
                "DELETE",
                target,
                "",
                capability="push",
                actions=PUSH,
                host=host,
                url=urljoin(str(response.url), location),
            )
            cancel.close()
    except RegistryError as exc:
        log.info("cross-repo mount of %s from %s into %s failed: %s", digest, source, target, exc)
    return False


@dataclass
class Published:
    """Where publish stored an index, and which cache repositories refused it (and why)."""

    stored: list[Repository] = field(default_factory=list)
    refused: dict[Repository, str] = field(default_factory=dict)


def publish(
    client: RegistryClient,
    caches: Sequence[Repository],
    indexed: IndexedLayer,
    key: VariantKey,
    index_blob: bytes,
    windows_blob: bytes = b"",
    sign_key: SigningKey | None = None,
) -> Published:
    """Store a freshly built index (and its windows blob) as the `key` variant of the layer's
    entry in every cache repository that lets us push; with sign_key, signed by it. Never
    raises: a refusal (no push permission, any registry error) moves on to the next
    repository, logged at info (the builder sums them up once per image: report_refusals)."""
    done = Published()
    for cache in caches:
        source = next(iter(done.stored), None)
        try:
            shape = _publish_in(
                client, cache, indexed, key, index_blob, windows_blob, sign_key, source
            )
        except RegistryError as exc:
            why = "no push permission there" if isinstance(exc, AuthenticationError) else "failed"
            log.info(
                "layer %s: not storing its index in cache %s (%s): %s",
                indexed.layer_digest,
                cache,
                why,
                exc,
            )
            done.refused[cache] = f"{why}: {exc}"
            continue
        log.info(
            "layer %s: stored its index (%s) in cache %s (%s entry)",
            indexed.layer_digest,
            key,
            cache,
            shape,
        )
        done.stored.append(cache)
    return done


def report_refusals(results: Sequence[Published]) -> None:
    """One warning per cache repository that refused indexes of an image (not one per layer),
    saying where they went instead: the image still gets its index, only reuse suffers."""
    stored = {cache for result in results for cache in result.stored}
    refused: dict[Repository, tuple[int, str]] = {}
    for result in results:
        for cache, why in result.refused.items():
            count, _ = refused.get(cache, (0, why))
            refused[cache] = (count + 1, why)
    for cache, (count, why) in refused.items():
        log.warning(
            "layer index cache %s did not take %d index%s (%s); stored in: %s",
            cache,
            count,
            "" if count == 1 else "es",
            why,
            ", ".join(sorted(map(str, stored)))
            or "no cache repository (other images will index these layers again)",
        )


def _publish_in(
    client: RegistryClient,
    cache: Repository,
    indexed: IndexedLayer,
    key: VariantKey,
    index_blob: bytes,
    windows_blob: bytes,
    sign_key: SigningKey | None,
    source: Repository | None,
) -> Shape:
    """Store the variant in cache (blobs mounted from source, a cache that has them, where
    the registry allows); the shape of the entry now."""
    client.push_blob(cache, EMPTY_JSON, EMPTY_CONFIG.digest)
    if indexed.windows_digest:
        client.push_blob(cache, windows_blob, indexed.windows_digest, mount_from=source)
    client.push_blob(cache, index_blob, indexed.index_digest, mount_from=source)
    manifest = variant_manifest(indexed, key)
    digest = sha256_digest(manifest)
    new = variant_descriptor(indexed.layer_digest, manifest, digest, key)
    tag = cache_tag(indexed.layer_digest)
    ref = Reference(cache.registry, cache.name, tag=tag, tag_given=True)
    shape: Shape = "manifest"
    for attempt in range(_ROOT_WRITE_ATTEMPTS):
        try:
            entry = _read_entry(client, ref)
        except CacheEntryError as exc:
            log.warning("replacing layer index cache entry %s: %s", ref, exc)
            entry = None
        others = _kept_variants(client, cache, entry, indexed.layer_digest) if entry else []
        planned = updated_root(
            entry.shape if entry else None, others, indexed.layer_digest, new, manifest, key
        )
        shape = planned.shape
        if entry is not None and planned.data == entry.root.data:
            break  # already stored (a deterministic rebuild): nothing to write
        if planned.shape == "index":  # an index may only name manifests the repository has
            client.push_manifest(cache, digest, manifest, OCI_MANIFEST)
        try:
            client.push_manifest(
                cache,
                tag,
                planned.data,
                planned.media_type,
                if_match=entry.root.etag if entry is not None else None,
            )
        except UnexpectedResponse as exc:
            if exc.status == 412 and attempt + 1 < _ROOT_WRITE_ATTEMPTS:
                continue  # another builder updated the entry meanwhile: merge with theirs
            raise
        break
    if sign_key is not None:
        signing.sign_manifest(
            client, cache, Descriptor(OCI_MANIFEST, digest, len(manifest)), sign_key
        )
    return shape


def _kept_variants(
    client: RegistryClient, cache: Repository, entry: CacheEntry, layer_digest: str
) -> list[Variant]:
    """The variants of entry to keep beside a new one: this layer's, with their keys. An index
    entry's hints are taken as they are (they only decide what stays listed); a variant that
    states no key is read to learn it, and dropped if it cannot be (gone, broken, another
    layer's). RegistryError when the registry fails meanwhile: better no update than one that
    drops a variant for a passing error."""
    kept: list[Variant] = []
    for variant in entry.variants:
        hinted = variant.descriptor.annotations.get(LAYER_DIGEST_ANNOTATION) == layer_digest
        if entry.shape == "index" and variant.key is not None and hinted:
            kept.append(variant)
            continue
        try:
            manifest = _variant_manifest(client, cache, entry, variant)
            key = _key_of(client, cache, manifest, layer_digest)
        except ManifestNotFound:
            key = _Rejected("the index lists it, the repository does not have it")
        if isinstance(key, _Rejected):
            log.info(
                "dropping variant %s from cache entry: %s", variant.descriptor.digest, key.reason
            )
            continue
        kept.append(Variant(variant.descriptor, key))
    return kept
