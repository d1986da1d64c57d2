"""Layer cache entries of both shapes against a real docker-registry 2.8 (and peryx): an
entry that is one manifest (as older versions wrote it) or an OCI index of variants (span size,
format version) is reused by a build of the same span size and never by another; storing keeps
the entry's shape, a manifest turning into an index only when a second variant comes.

These builds stay in the image's own namespace cache (--no-shared-cache): the registry-wide
one is shared by every test of the session. Every build signs with the session key (see
test_indexer_trust), so each reuse below also proves the variant's signature was verified
where it was found."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, random_layer, unique

from harness.images import BuiltImage
from harness.peryx import Peryx
from harness.registry import Registry
from harness.trust import sign_pushed
from snapshotter.indexer.artifact import cache_manifest
from snapshotter.indexer.cache_entry import (
    FORMAT_VERSION_ANNOTATION,
    SPAN_SIZE_ANNOTATION,
    VariantKey,
    index_root,
    variant_descriptor,
)
from snapshotter.indexer.layer_cache import cache_tag
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Manifest, sha256_digest
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.signatures import find_signatures
from snapshotter.vocabulary.artifact import cached_index_for

pytestmark = pytest.mark.stack

Index = Callable[..., CliResult]
LAYER = 400 << 10
SPAN, OTHER_SPAN = 65536, 131072
FLAGS = ("--plain-http", "--min-layer-size", str(64 << 10), "--no-shared-cache")


class Images:
    """Images of one namespace sharing a base layer; each build indexes one of them."""

    def __init__(self, index: Index, dist: Target, workdir: Path) -> None:
        self.index, self.dist, self.workdir = index, dist, workdir
        self.base = random_layer("base", LAYER)
        self.cache = Repository(dist.host, f"{dist.namespace}/lazysnap-index-cache")
        self.made: list[BuiltImage] = []

    def build(self, span: int) -> tuple[CliResult, BuiltImage]:
        """Push a new image (the shared base + a layer of its own) and index it at span."""
        name = unique("app")
        image = build_image(self.workdir, name, [self.base, random_layer(name, LAYER)])
        repo = f"{self.dist.namespace}/{name}"
        with self.dist.client() as client:
            push_image(client, image, self.dist.host, repo, "v1")
        ref = f"{self.dist.host}/{repo}:v1"
        result = self.index("build", ref, *FLAGS, "--span-size", str(span))
        assert result.code == 0, result.err
        self.made.append(image)
        return result, image

    @property
    def base_digest(self) -> str:
        return self.made[0].layers[0].digest

    def entry(self, client: RegistryClient) -> Manifest:
        tag = cache_tag(self.base_digest)
        return client.get_manifest(Reference(self.cache.registry, self.cache.name, tag=tag))

    def variant(self, client: RegistryClient, digest: str) -> Manifest:
        return client.get_manifest(Reference(self.cache.registry, self.cache.name, digest=digest))

    def put_entry(self, client: RegistryClient, data: bytes, media_type: str) -> None:
        client.push_manifest(self.cache, cache_tag(self.base_digest), data, media_type)


@pytest.fixture
def images(lazysnap_index: Index, dist: Target, workdir: Path) -> Images:
    return Images(lazysnap_index, dist, workdir)


def _read(registry: Registry, offset: int, digest: str) -> int:
    fetched = registry.blob_fetches(since=offset).get(digest)
    return fetched.bytes if fetched else 0


def _keys(entry: Manifest) -> list[tuple[str, str]]:
    return [
        (d.annotations[SPAN_SIZE_ANNOTATION], d.annotations[FORMAT_VERSION_ANNOTATION])
        for d in entry.manifests
    ]


def test_a_new_entry_is_one_manifest_stating_its_span_size_and_format(images: Images) -> None:
    result, _ = images.build(SPAN)
    assert "2 layers indexed, 0 reused" in result.out
    with images.dist.client() as client:
        entry = images.entry(client)
        assert entry.media_type == OCI_MANIFEST
        assert entry.annotations[SPAN_SIZE_ANNOTATION] == str(SPAN)
        assert entry.annotations[FORMAT_VERSION_ANNOTATION] == "2"  # gzip: windows blob
        assert find_signatures(client, images.cache, entry.digest)  # signed where it is


def test_an_old_single_manifest_entry_is_imported_then_grows_into_an_index(
    images: Images, registry: Registry
) -> None:
    images.build(SPAN)
    with images.dist.client() as client:
        indexed = cached_index_for(images.entry(client), images.base_digest)
        # What a version from before span sizes were stated wrote (and signed) for the layer.
        legacy = cache_manifest(indexed)
        images.put_entry(client, legacy, OCI_MANIFEST)
        sign_pushed(client, images.cache, legacy)

    offset = registry.log_offset()
    reused, _ = images.build(SPAN)
    assert "1 layer indexed, 1 reused" in reused.out
    assert _read(registry, offset, images.base_digest) == 0
    with images.dist.client() as client:
        assert images.entry(client).data == legacy  # used as it is, not rewritten

    # Its index blob says span size 65536: a build asking another one reads the layer and
    # adds a variant; the manifest becomes an index of both.
    offset = registry.log_offset()
    other, _ = images.build(OTHER_SPAN)
    assert "2 layers indexed, 0 reused" in other.out
    assert _read(registry, offset, images.base_digest) == images.made[0].layers[0].size
    with images.dist.client() as client:
        entry = images.entry(client)
        assert entry.media_type == OCI_INDEX
        assert entry.manifests[0].digest == sha256_digest(legacy)
        assert _keys(entry) == [(str(SPAN), "2"), (str(OTHER_SPAN), "2")]

    # Both variants are now reused from the index, each by the build of its span size.
    for span in (SPAN, OTHER_SPAN):
        offset = registry.log_offset()
        again, _ = images.build(span)
        assert "1 layer indexed, 1 reused" in again.out, (span, again.out)
        assert _read(registry, offset, images.base_digest) == 0


def test_an_unusable_manifest_entry_is_replaced_in_place(
    images: Images, registry: Registry
) -> None:
    images.build(SPAN)
    with images.dist.client() as client:
        stored = images.entry(client)
        # The same index stored unsigned, the old way: whoever can push there could have.
        unsigned = cache_manifest(cached_index_for(stored, images.base_digest))
        images.put_entry(client, unsigned, OCI_MANIFEST)

    offset = registry.log_offset()
    result, _ = images.build(SPAN)
    assert "2 layers indexed, 0 reused" in result.out
    assert _read(registry, offset, images.base_digest) > 0
    with images.dist.client() as client:
        entry = images.entry(client)
        # Still one manifest: the variant of the same span size and format was replaced.
        assert entry.media_type == OCI_MANIFEST
        assert entry.digest == stored.digest  # the same index gives the same manifest


def test_an_index_entry_stays_an_index(images: Images, registry: Registry) -> None:
    images.build(SPAN)
    with images.dist.client() as client:
        stored = images.entry(client)
        key_hint = variant_descriptor(
            images.base_digest, stored.data, stored.digest, _key_of(stored)
        )
        # Another version wrote the entry as an index of one variant.
        images.put_entry(client, index_root(images.base_digest, [key_hint]), OCI_INDEX)

    offset = registry.log_offset()
    reused, _ = images.build(SPAN)
    assert "1 layer indexed, 1 reused" in reused.out
    assert _read(registry, offset, images.base_digest) == 0

    other, _ = images.build(OTHER_SPAN)
    assert "2 layers indexed, 0 reused" in other.out
    with images.dist.client() as client:
        entry = images.entry(client)
        assert entry.media_type == OCI_INDEX
        assert entry.manifests[0].digest == stored.digest
        assert _keys(entry) == [(str(SPAN), "2"), (str(OTHER_SPAN), "2")]


def test_an_unsigned_variant_in_an_index_is_not_adopted_and_the_index_keeps_its_shape(
    images: Images, registry: Registry
) -> None:
    images.build(SPAN)
    with images.dist.client() as client:
        stored = images.entry(client)
        unsigned = cache_manifest(cached_index_for(stored, images.base_digest))
        client.push_manifest(images.cache, sha256_digest(unsigned), unsigned, OCI_MANIFEST)
        # Listed without hints, as an older writer would: the reader learns its span size
        # from the index blob, then finds no signature by the build's key on it.
        plain = {
            "mediaType": OCI_MANIFEST,
            "digest": sha256_digest(unsigned),
            "size": len(unsigned),
        }
        root = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [plain]}
        images.put_entry(client, json.dumps(root).encode(), OCI_INDEX)

    offset = registry.log_offset()
    result, _ = images.build(SPAN)
    assert "2 layers indexed, 0 reused" in result.out
    assert _read(registry, offset, images.base_digest) > 0
    with images.dist.client() as client:
        entry = images.entry(client)
        assert entry.media_type == OCI_INDEX  # one variant, still an index
        assert [d.digest for d in entry.manifests] == [stored.digest]
        assert find_signatures(client, images.cache, stored.digest)


def test_an_entry_grows_into_an_index_on_a_registry_with_the_referrers_api(
    lazysnap_index: Index, peryx: Peryx, docker_config: Callable[[Target], None], workdir: Path
) -> None:
    native = Target(peryx.host, peryx.route, Credentials("lazysnap", peryx.token))
    docker_config(native)
    images = Images(lazysnap_index, native, workdir)
    images.build(SPAN)
    assert "2 layers indexed, 0 reused" in images.build(OTHER_SPAN)[0].out
    with native.client() as client:
        entry = images.entry(client)
        assert entry.media_type == OCI_INDEX
        assert _keys(entry) == [(str(SPAN), "2"), (str(OTHER_SPAN), "2")]
    for span in (SPAN, OTHER_SPAN):
        assert "1 layer indexed, 1 reused" in images.build(span)[0].out


def _key_of(manifest: Manifest) -> VariantKey:
    key = VariantKey.from_annotations(manifest.annotations)
    assert key is not None
    return key
