"""The manifests lazysnap pushes: deterministic bytes, and refusal of foreign/mistagged ones."""

from __future__ import annotations

import json
import re

import pytest

from snapshotter.indexer.artifact import artifact_manifest, cache_manifest
from snapshotter.indexer.layer_cache import CacheNameError, cache_tag, default_cache_repo
from snapshotter.indexer.show import LayerView, PlatformView, ShowReport
from snapshotter.remote.manifest import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    OCI_MANIFEST,
    ORAS_ARTIFACT_MANIFEST,
    Descriptor,
    Manifest,
    sha256_digest,
)
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    INDEX_BLOB_MEDIA_TYPE,
    LAYER_DIGEST_ANNOTATION,
    ArtifactError,
    IndexedLayer,
    cached_index_for,
    indexed_layers,
)

LAYER = "sha256:" + "a" * 64
INDEX_BLOB = "sha256:" + "c" * 64
SUBJECT = Descriptor(OCI_MANIFEST, "sha256:" + "b" * 64, 123)


def _manifest(data: bytes) -> Manifest:
    return Manifest(data, sha256_digest(data), OCI_MANIFEST)


def test_empty_config_digest_is_that_of_the_pushed_blob() -> None:
    assert sha256_digest(EMPTY_JSON) == EMPTY_DIGEST


def test_artifact_manifest_has_the_referrer_shape_and_no_created_date() -> None:
    layers = [IndexedLayer(LAYER, INDEX_BLOB, 99)]
    raw = artifact_manifest(SUBJECT, layers)
    assert raw == artifact_manifest(SUBJECT, list(layers))  # same input, same digest
    doc = json.loads(raw)
    assert doc["mediaType"] == OCI_MANIFEST
    assert doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"] == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": EMPTY_DIGEST,
        "size": 2,
    }
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": SUBJECT.digest, "size": 123}
    assert doc["layers"] == [
        {
            "mediaType": INDEX_BLOB_MEDIA_TYPE,
            "digest": INDEX_BLOB,
            "size": 99,
            "annotations": {LAYER_DIGEST_ANNOTATION: LAYER},
        }
    ]
    assert "annotations" not in doc  # in particular no org.opencontainers.image.created
    assert indexed_layers(_manifest(raw)) == layers


def test_cache_entry_for_another_layer_is_refused() -> None:
    raw = cache_manifest(IndexedLayer(LAYER, INDEX_BLOB, 99))
    assert cached_index_for(_manifest(raw), LAYER).index_size == 99
    other = "sha256:" + "d" * 64
    with pytest.raises(ArtifactError, match=f"holds no index for layer {other}"):
        cached_index_for(_manifest(raw), other)


def test_foreign_artifact_type_is_refused() -> None:
    doc = {"mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example", "layers": []}
    with pytest.raises(ArtifactError, match=re.escape("'application/vnd.example'")):
        indexed_layers(_manifest(json.dumps(doc).encode()))


def test_cache_names() -> None:
    assert default_cache_repo("team/app/web") == "team/lazysnap-index-cache"
    assert default_cache_repo("busybox") == "lazysnap-index-cache"
    assert cache_tag(LAYER) == "layer-sha256-" + "a" * 64
    with pytest.raises(CacheNameError, match="sha256:zz"):
        cache_tag("sha256:zz")


def test_an_oras_artifact_manifest_lists_its_indexes_in_blobs() -> None:
    blob = {
        "mediaType": INDEX_BLOB_MEDIA_TYPE,
        "digest": INDEX_BLOB,
        "size": 321,
        "annotations": {LAYER_DIGEST_ANNOTATION: LAYER},
    }
    data = json.dumps(
        {"mediaType": ORAS_ARTIFACT_MANIFEST, "artifactType": ARTIFACT_TYPE, "blobs": [blob]}
    ).encode()
    manifest = Manifest(data, sha256_digest(data), ORAS_ARTIFACT_MANIFEST)
    assert indexed_layers(manifest) == [IndexedLayer(LAYER, INDEX_BLOB, 321)]


def test_index_show_warns_when_the_artifact_indexes_no_layer_of_the_manifest() -> None:
    view = PlatformView(
        "linux/amd64",
        "sha256:" + "d" * 64,
        "sha256:" + "e" * 64,
        ARTIFACT_TYPE,
        "oras",
        (LayerView(LAYER, 1000, "application/vnd.oci.image.layer.v1.tar+gzip"),),
    )
    rendered = ShowReport("reg/app:1", [view]).render()
    assert f"warning: artifact sha256:{'e' * 64} lists no index for any layer" in rendered
    indexed = LayerView(LAYER, 1000, "x", INDEX_BLOB, 321, 1, 1, "gzip")
    quiet = ShowReport("reg/app:1", [PlatformView("-", "d", "e", "t", "oras", (indexed,))])
    assert "warning" not in quiet.render()
