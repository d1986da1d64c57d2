"""The OCI manifests lazysnap pushes, built byte-for-byte deterministically, and read back.

* Artifact manifest, one per platform manifest: an OCI image manifest with
  artifactType = ARTIFACT_TYPE, the empty config, one layer per indexed image layer (mediaType
  INDEX_BLOB_MEDIA_TYPE, annotation LAYER_DIGEST_ANNOTATION = the image layer digest) and
  subject = the platform manifest. No `org.opencontainers.image.created`: the same image and
  layer indexes always give the same artifact digest, which makes rebuilds idempotent.
* Cache manifest, one per image layer, tagged `layer-sha256-<hex>` in the cache repository:
  the same shape without subject, with exactly one layer (the index blob) and the layer digest
  also as a manifest annotation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.index.model import ARTIFACT_TYPE, INDEX_BLOB_MEDIA_TYPE, LAYER_DIGEST_ANNOTATION
from snapshotter.remote.errors import InvalidManifest
from snapshotter.remote.manifest import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
)
from snapshotter.remote.referrers import referrer_manifest

EMPTY_CONFIG = Descriptor(OCI_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))


class ArtifactError(ValueError):
    """A manifest found in the registry is not a lazysnap index manifest we can use."""


@dataclass(frozen=True)
class IndexedLayer:
    """An image layer and the index blob that describes it."""

    layer_digest: str
    index_digest: str
    index_size: int

    def descriptor(self) -> Descriptor:
        return Descriptor(
            INDEX_BLOB_MEDIA_TYPE,
            self.index_digest,
            self.index_size,
            annotations={LAYER_DIGEST_ANNOTATION: self.layer_digest},
        )


def artifact_manifest(subject: Descriptor, layers: Sequence[IndexedLayer]) -> bytes:
    """The referrer manifest for one platform manifest; layers keep the image's layer order."""
    return referrer_manifest(subject, ARTIFACT_TYPE, [layer.descriptor() for layer in layers])


def cache_manifest(layer: IndexedLayer) -> bytes:
    """The per-layer manifest stored under the layer's tag in the cache repository."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [layer.descriptor().to_json()],
        "annotations": {LAYER_DIGEST_ANNOTATION: layer.layer_digest},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def indexed_layers(manifest: Manifest) -> list[IndexedLayer]:
    """The (image layer, index blob) pairs an artifact or cache manifest lists. ArtifactError
    if it is not a lazysnap index manifest; layers of other media types are ignored."""
    try:
        kind = manifest.artifact_type
        layers = manifest.layers
    except InvalidManifest as exc:
        raise ArtifactError(str(exc)) from None
    if kind != ARTIFACT_TYPE:
        raise ArtifactError(
            f"manifest {manifest.where}: artifactType is {kind!r}, not {ARTIFACT_TYPE}"
        )
    found: list[IndexedLayer] = []
    for desc in layers:
        layer_digest = desc.annotations.get(LAYER_DIGEST_ANNOTATION, "")
        if desc.media_type == INDEX_BLOB_MEDIA_TYPE and layer_digest:
            found.append(IndexedLayer(layer_digest, desc.digest, desc.size))
    return found


def cached_index_for(manifest: Manifest, layer_digest: str) -> IndexedLayer:
    """The index blob a cache manifest holds for layer_digest. ArtifactError if it holds none
    for that layer: a mistagged or hostile cache entry must not be trusted."""
    for layer in indexed_layers(manifest):
        if layer.layer_digest == layer_digest:
            return layer
    raise ArtifactError(f"cache manifest {manifest.where} holds no index for layer {layer_digest}")
