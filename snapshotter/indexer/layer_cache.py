"""Layer-level reuse of indexes, per namespace (or one --cache-repo).

An index depends only on the layer's bytes, and base layers are shared by many images, so every
built index is also stored once per layer in a cache repository:

* repository: `--cache-repo`, else `<first path component of the image repo>/lazysnap-index-
  cache` (`team/app` -> `team/lazysnap-index-cache`), or `lazysnap-index-cache` for a
  single-component repository. Registries grant write permission per namespace (Harbor
  projects, peryx routes, Docker Hub users), so the default stays where the user can push.
* tag: `layer-sha256-<hex of the layer digest>` on an OCI manifest (artifactType ARTIFACT_TYPE,
  empty config) whose layers are the index blob and, for a version-2 index, its windows blob,
  annotated with the layer digest.

Before indexing a layer the builder GETs that tag. On a hit it never reads the layer: it
cross-repo mounts the index blob and its windows blob into the image repository (or, when the
registry refuses the mount, copies them with GET + PUT). A cache manifest for another layer
(mistagged, hostile) or one that cannot be read is ignored with a warning and the layer is
indexed from its bytes.
The first index stored for a layer wins: a later build with another --span-size reuses it.

A build that signs (`--sign-key`) signs each cache entry it stores, and reuses only entries that
carry a valid signature by its own key: anyone who can push to the cache repository could
otherwise put a forged index there for the builder to adopt and sign. An entry without that
signature is ignored (logged) and the layer indexed from its bytes; the entry is then re-stored
and signed, so the next build reuses it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from urllib.parse import urljoin

from snapshotter.index.codec import MAX_WINDOWS_BLOB
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.indexer import signing
from snapshotter.indexer.artifact import EMPTY_CONFIG, cache_manifest
from snapshotter.remote.auth import repository_scope
from snapshotter.remote.client import PUSH, RegistryClient
from snapshotter.remote.errors import ManifestNotFound, RegistryError
from snapshotter.remote.manifest import EMPTY_JSON, OCI_MANIFEST, Descriptor, sha256_digest
from snapshotter.remote.reference import Reference, Repository
from snapshotter.trust.keys import SigningKey
from snapshotter.vocabulary.artifact import ArtifactError, IndexedLayer, cached_index_for

log = logging.getLogger(__name__)

CACHE_REPO_NAME = "lazysnap-index-cache"
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


class CacheNameError(ValueError):
    """A layer digest that cannot name a cache tag."""


def default_cache_repo(image_repo: str) -> str:
    head, sep, _ = image_repo.partition("/")
    return f"{head}/{CACHE_REPO_NAME}" if sep else CACHE_REPO_NAME


def cache_tag(layer_digest: str) -> str:
    match = _SHA256.fullmatch(layer_digest)
    if match is None:
        raise CacheNameError(f"layer digest {layer_digest!r} is not sha256:<64 hex>")
    return f"layer-sha256-{match.group(1)}"


def lookup(
    client: RegistryClient,
    cache: Repository,
    layer_digest: str,
    sign_key: SigningKey | None = None,
) -> IndexedLayer | None:
    """The cached index of layer_digest, or None (absent, unusable: warned). With sign_key:
    only an entry that key signed."""
    tag = cache_tag(layer_digest)
    ref = Reference(cache.registry, cache.name, tag=tag, tag_given=True)
    try:
        manifest = client.get_manifest(ref)
    except ManifestNotFound:
        return None
    except RegistryError as exc:
        log.warning("layer index cache %s unreadable, indexing the layer itself: %s", ref, exc)
        return None
    try:
        indexed = cached_index_for(manifest, layer_digest)
    except ArtifactError as exc:
        log.warning("ignoring layer index cache entry %s: %s", ref, exc)
        return None
    if sign_key is not None:
        try:
            signed = signing.signed_by(client, cache, manifest.digest, sign_key)
        except RegistryError as exc:
            log.warning("layer index cache %s unreadable, indexing the layer itself: %s", ref, exc)
            return None
        if not signed:
            log.warning(
                "ignoring layer index cache entry %s: not signed by key %s (indexing the layer "
                "itself, then storing and signing its index)",
                ref,
                sign_key.public.key_id,
            )
            return None
    # An entry whose blobs are gone (a registry cleaned by hand, a broken mirror) would fail the
    # whole build when adopted: index the layer itself instead.
    for kind, digest in (("index", indexed.index_digest), ("windows", indexed.windows_digest)):
        if not digest:
            continue
        try:
            present = client.blob_exists(cache, digest)
        except RegistryError as exc:
            log.warning("layer index cache %s unreadable, indexing the layer itself: %s", ref, exc)
            return None
        if not present:
            log.warning(
                "ignoring layer index cache entry %s: its %s blob %s is missing",
                ref,
                kind,
                digest,
            )
            return None
    return indexed


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


def publish(
    client: RegistryClient,
    cache: Repository,
    indexed: IndexedLayer,
    index_blob: bytes,
    windows_blob: bytes = b"",
    sign_key: SigningKey | None = None,
) -> None:
    """Store a freshly built index (and its windows blob) in the cache repository under the
    layer's tag; with sign_key, signed by it."""
    client.push_blob(cache, EMPTY_JSON, EMPTY_CONFIG.digest)
    if indexed.windows_digest:
        client.push_blob(cache, windows_blob, indexed.windows_digest)
    client.push_blob(cache, index_blob, indexed.index_digest)
    manifest = cache_manifest(indexed)
    client.push_manifest(cache, cache_tag(indexed.layer_digest), manifest, OCI_MANIFEST)
    if sign_key is not None:
        described = Descriptor(OCI_MANIFEST, sha256_digest(manifest), len(manifest))
        signing.sign_manifest(client, cache, described, sign_key)
