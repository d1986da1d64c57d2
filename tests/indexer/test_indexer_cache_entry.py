"""Layer cache entries of both shapes, without a registry: which variant a build may use, and
the root a store writes (a manifest stays a manifest until a second variant comes, an index
stays an index); the cache repositories a build looks in."""

from __future__ import annotations

import json

import pytest

from snapshotter.indexer.artifact import cache_manifest
from snapshotter.indexer.cache_entry import (
    MAX_VARIANTS,
    SPAN_SIZE_ANNOTATION,
    CacheEntryError,
    Variant,
    VariantKey,
    index_root,
    parse_entry,
    updated_root,
    variant_descriptor,
    variant_manifest,
)
from snapshotter.indexer.layer_cache import CACHE_REPO_NAME, cache_repositories
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, Manifest, sha256_digest
from snapshotter.remote.reference import Repository
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    LAYER_DIGEST_ANNOTATION,
    IndexedLayer,
    cached_index_for,
)

LAYER = "sha256:" + "a" * 64
OTHER_LAYER = "sha256:" + "e" * 64
SMALL, BIG = VariantKey(65536, 2), VariantKey(1 << 20, 2)


def _indexed(fill: str) -> IndexedLayer:
    return IndexedLayer(LAYER, "sha256:" + fill * 64, 99, "sha256:" + "d" * 64, 5000)


def _variant(fill: str, key: VariantKey) -> tuple[bytes, Descriptor]:
    data = variant_manifest(_indexed(fill), key)
    return data, variant_descriptor(LAYER, data, sha256_digest(data), key)


def _root(data: bytes) -> Manifest:
    doc = json.loads(data)
    return Manifest(data, sha256_digest(data), doc["mediaType"])


def test_a_variant_manifest_is_a_cache_manifest_that_states_its_key() -> None:
    data, _ = _variant("c", SMALL)
    entry = parse_entry(_root(data))
    assert entry.shape == "manifest"
    [variant] = entry.variants
    assert variant.key == SMALL
    # Readers of the old shape (and the source-digest check) still find the layer's index.
    assert cached_index_for(entry.root, LAYER) == _indexed("c")
    assert json.loads(data)["artifactType"] == ARTIFACT_TYPE


def test_a_manifest_from_before_keys_were_stated_is_one_variant_of_unknown_key() -> None:
    entry = parse_entry(_root(cache_manifest(_indexed("c"))))
    assert entry.shape == "manifest"
    assert [v.key for v in entry.variants] == [None]
    # Unknown keys are candidates (the caller learns the key from the index blob).
    assert entry.candidates(65536) == list(entry.variants)


def test_an_index_entry_offers_only_variants_that_fit_the_build_best_format_first() -> None:
    _, small_v1 = _variant("1", VariantKey(65536, 1))
    _, small_v2 = _variant("2", SMALL)
    _, big = _variant("3", BIG)
    _, future = _variant("4", VariantKey(65536, 9))
    unstated = Descriptor(OCI_MANIFEST, "sha256:" + "5" * 64, 10)
    entry = parse_entry(_root(index_root(LAYER, [small_v1, big, future, unstated, small_v2])))
    assert entry.shape == "index"
    assert [v.descriptor for v in entry.candidates(65536)] == [small_v2, small_v1, unstated]
    assert [v.descriptor for v in entry.candidates(1 << 20)] == [big, unstated]
    assert [v.descriptor for v in entry.candidates(4 << 20)] == [unstated]
    assert SMALL.problem(1 << 20) == "span size 65536, the build asks 1048576"
    for bad in ("²", "9" * 5000, "-1", ""):
        assert (
            VariantKey.from_annotations({**SMALL.annotations(), SPAN_SIZE_ANNOTATION: bad}) is None
        )
    assert VariantKey(65536, 9).problem(65536) is not None


def test_roots_that_are_neither_shape_are_refused() -> None:
    empty = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    with pytest.raises(CacheEntryError, match="listing no manifest"):
        parse_entry(_root(empty))
    config = Manifest(b"{}", sha256_digest(b"{}"), "application/vnd.oci.image.config.v1+json")
    with pytest.raises(CacheEntryError, match="media type"):
        parse_entry(config)


def test_a_new_entry_with_one_variant_is_a_manifest() -> None:
    data, new = _variant("c", SMALL)
    root = updated_root(None, [], LAYER, new, data, SMALL)
    assert (root.shape, root.media_type, root.data) == ("manifest", OCI_MANIFEST, data)


def test_a_manifest_entry_of_the_same_key_is_replaced_in_place() -> None:
    old_data, _ = _variant("b", SMALL)
    entry = parse_entry(_root(old_data))
    data, new = _variant("c", SMALL)
    root = updated_root(entry.shape, list(entry.variants), LAYER, new, data, SMALL)
    assert (root.shape, root.data) == ("manifest", data)


def test_a_second_variant_turns_a_manifest_into_an_index_of_both() -> None:
    old_data, _ = _variant("b", SMALL)
    entry = parse_entry(_root(old_data))
    data, new = _variant("c", BIG)
    root = updated_root(entry.shape, list(entry.variants), LAYER, new, data, BIG)
    assert (root.shape, root.media_type) == ("index", OCI_INDEX)
    doc = json.loads(root.data)
    assert [m["digest"] for m in doc["manifests"]] == [sha256_digest(old_data), new.digest]
    assert doc["annotations"] == {LAYER_DIGEST_ANNOTATION: LAYER}
    listed = parse_entry(_root(root.data))
    assert [v.key for v in listed.variants] == [SMALL, BIG]


def test_an_index_entry_stays_an_index_even_with_one_variant() -> None:
    _, old = _variant("b", SMALL)
    entry = parse_entry(_root(index_root(LAYER, [old])))
    data, new = _variant("c", SMALL)
    root = updated_root(entry.shape, list(entry.variants), LAYER, new, data, SMALL)
    assert root.shape == "index"
    assert [m["digest"] for m in json.loads(root.data)["manifests"]] == [new.digest]


def test_an_index_entry_replaces_a_variant_in_its_place_and_appends_a_new_key() -> None:
    _, small = _variant("b", SMALL)
    _, big = _variant("c", BIG)
    entry = parse_entry(_root(index_root(LAYER, [small, big])))
    data, new_small = _variant("d", SMALL)
    replaced = updated_root(entry.shape, list(entry.variants), LAYER, new_small, data, SMALL)
    assert [m["digest"] for m in json.loads(replaced.data)["manifests"]] == [
        new_small.digest,
        big.digest,
    ]
    key = VariantKey(4 << 20, 2)
    data, added = _variant("e", key)
    appended = updated_root(entry.shape, list(entry.variants), LAYER, added, data, key)
    assert [m["digest"] for m in json.loads(appended.data)["manifests"]] == [
        small.digest,
        big.digest,
        added.digest,
    ]


def test_variants_without_a_known_key_are_not_kept_and_the_index_is_bounded() -> None:
    many = [_variant(f"{n:x}", VariantKey(65536 * (n + 1), 2))[1] for n in range(MAX_VARIANTS)]
    unknown = Variant(Descriptor(OCI_MANIFEST, "sha256:" + "f" * 64, 10), None)
    entry = parse_entry(_root(index_root(LAYER, many)))
    key = VariantKey(64 << 20, 2)
    data, new = _variant("0", key)
    root = updated_root("index", [unknown, *entry.variants], LAYER, new, data, key)
    listed = [m["digest"] for m in json.loads(root.data)["manifests"]]
    assert listed == [d.digest for d in many[1:]] + [new.digest]  # the oldest went first


def test_cache_repositories_own_namespace_first_then_extra_then_registry_wide() -> None:
    image = Repository("reg:5000", "team/app/web")
    assert [r.name for r in cache_repositories(image, ("shared/cache",))] == [
        "team/lazysnap-index-cache",
        "shared/cache",
        CACHE_REPO_NAME,
    ]
    assert all(r.registry == "reg:5000" for r in cache_repositories(image))
    assert [r.name for r in cache_repositories(image, shared=False)] == [
        "team/lazysnap-index-cache"
    ]
    single = Repository("reg:5000", "busybox")
    assert [r.name for r in cache_repositories(single, (CACHE_REPO_NAME,))] == [CACHE_REPO_NAME]
