"""Version-2 indexes in the registry: each gzip layer's index blob is followed by its windows
blob in the artifact, the layer cache and `index show`; discovery still fetches only the
index blob."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, random_layer, unique

from harness.images import file, layer_tar
from snapshotter.index.codec import decode_index
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.indexer.artifact import artifact_manifest, cache_manifest
from snapshotter.indexer.layer_cache import cache_tag
from snapshotter.remote.manifest import OCI_MANIFEST, Descriptor, Manifest, sha256_digest
from snapshotter.remote.reference import Reference, Repository
from snapshotter.vocabulary.artifact import (
    INDEX_BLOB_MEDIA_TYPE,
    LAYER_DIGEST_ANNOTATION,
    WINDOWS_BLOB_MEDIA_TYPE,
    IndexedLayer,
    artifact_contents,
    cached_index_for,
    indexed_layers,
)

LAYER = "sha256:" + "a" * 64
OTHER = "sha256:" + "e" * 64
INDEX_BLOB = "sha256:" + "c" * 64
WINDOWS_BLOB = "sha256:" + "d" * 64
SUBJECT = Descriptor(OCI_MANIFEST, "sha256:" + "b" * 64, 123)


def _manifest(data: bytes) -> Manifest:
    return Manifest(data, sha256_digest(data), OCI_MANIFEST)


def test_the_windows_blob_follows_its_index_blob_and_round_trips() -> None:
    layers = [
        IndexedLayer(LAYER, INDEX_BLOB, 99, WINDOWS_BLOB, 5000),
        IndexedLayer(OTHER, INDEX_BLOB, 7),
    ]
    raw = artifact_manifest(SUBJECT, layers)
    doc = json.loads(raw)
    assert [(d["mediaType"], d["digest"], d["annotations"]) for d in doc["layers"]] == [
        (INDEX_BLOB_MEDIA_TYPE, INDEX_BLOB, {LAYER_DIGEST_ANNOTATION: LAYER}),
        (WINDOWS_BLOB_MEDIA_TYPE, WINDOWS_BLOB, {LAYER_DIGEST_ANNOTATION: LAYER}),
        (INDEX_BLOB_MEDIA_TYPE, INDEX_BLOB, {LAYER_DIGEST_ANNOTATION: OTHER}),
    ]
    assert indexed_layers(_manifest(raw)) == layers
    cached = cached_index_for(_manifest(cache_manifest(layers[0])), LAYER)
    assert cached == layers[0]
    # discovery takes the index blobs only: the windows blob shares the layer annotation
    listed = artifact_contents(_manifest(raw)).layers
    assert [(blob.index_digest, blob.layer_digest) for blob in listed] == [
        (INDEX_BLOB, LAYER),
        (INDEX_BLOB, OTHER),
    ]


def test_a_windows_blob_without_its_index_blob_is_ignored() -> None:
    stray = Descriptor(
        WINDOWS_BLOB_MEDIA_TYPE, WINDOWS_BLOB, 5, annotations={LAYER_DIGEST_ANNOTATION: OTHER}
    )
    raw = artifact_manifest(SUBJECT, [IndexedLayer(LAYER, INDEX_BLOB, 99)])
    doc = json.loads(raw)
    doc["layers"].insert(0, stray.to_json())
    assert indexed_layers(_manifest(json.dumps(doc).encode())) == [
        IndexedLayer(LAYER, INDEX_BLOB, 99)
    ]


# -- against a real registry ---------------------------------------------------------------------

Index = Callable[..., CliResult]
LAYER_SIZE = 400 << 10  # incompressible: 32 KiB windows that zstd cannot shrink
BUILD_FLAGS = ("--plain-http", "--min-layer-size", str(64 << 10), "--span-size", "65536")


def _show(index: Index, ref: str) -> dict[str, Any]:
    result = index("show", ref, "--plain-http", "--json")
    assert result.code == 0, result.err
    doc: dict[str, Any] = json.loads(result.out)
    return doc


@pytest.mark.stack
def test_a_gzip_layer_gets_an_index_blob_and_a_windows_blob(
    lazysnap_index: Index, dist: Target, workdir: Path
) -> None:
    image = build_image(
        workdir, "v1", [random_layer("base", LAYER_SIZE), layer_tar([file("etc/motd", "hi\n")])]
    )
    first, second = f"{dist.namespace}/{unique('one')}", f"{dist.namespace}/{unique('two')}"
    with dist.client() as client:
        push_image(client, image, dist.host, first, "v1")
        push_image(client, image, dist.host, second, "v1")
    built = lazysnap_index("build", f"{dist.host}/{first}:v1", *BUILD_FLAGS)
    assert built.code == 0, built.err
    layer = image.layers[0]

    [platform] = _show(lazysnap_index, f"{dist.host}/{first}:v1")["platforms"]
    shown = platform["layers"][0]["index"]
    assert "error" not in shown
    windows = shown["windows"]
    # the windows are not inside the index blob any more: it is a fraction of them
    assert shown["size"] * 4 < windows["size"]
    assert shown["spans"] >= 6

    with dist.client() as client:
        repo = Repository(dist.host, first)
        artifact = client.get_manifest(
            Reference(dist.host, first, digest=platform["artifact"]["digest"])
        )
        assert [(d.media_type, d.digest, d.annotations) for d in artifact.layers] == [
            (INDEX_BLOB_MEDIA_TYPE, shown["digest"], {LAYER_DIGEST_ANNOTATION: layer.digest}),
            (WINDOWS_BLOB_MEDIA_TYPE, windows["digest"], {LAYER_DIGEST_ANNOTATION: layer.digest}),
        ]
        index = decode_index(
            client.get_blob(repo, shown["digest"], MAX_INDEX_BLOB_SIZE),
            expected_layer_digest=layer.digest,
        )
        assert index.windows is not None
        assert (index.windows.digest, index.windows.size) == (windows["digest"], windows["size"])
        windows_blob = client.get_blob(repo, windows["digest"], windows["size"])
        assert sha256_digest(windows_blob) == windows["digest"]

        # the layer cache holds both blobs, and another image reusing the index gets both
        cache = Repository(dist.host, f"{dist.namespace}/lazysnap-index-cache")
        cached = client.get_manifest(
            Reference(cache.registry, cache.name, tag=cache_tag(layer.digest))
        )
        assert [d.digest for d in cached.layers] == [shown["digest"], windows["digest"]]
    reused = lazysnap_index("build", f"{dist.host}/{second}:v1", *BUILD_FLAGS)
    assert reused.code == 0, reused.err
    assert "0 layers indexed, 1 reused" in reused.out
    [again] = _show(lazysnap_index, f"{dist.host}/{second}:v1")["platforms"]
    assert again["layers"][0]["index"]["windows"] == windows
    with dist.client() as client:
        copy = client.get_blob(Repository(dist.host, second), windows["digest"], windows["size"])
        assert copy == windows_blob
