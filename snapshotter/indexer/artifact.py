"""The OCI manifests lazysnap pushes, built byte-for-byte deterministically, and read back.

* Artifact manifest, one per platform manifest: an OCI image manifest with
  artifactType = ARTIFACT_TYPE, the empty config, one layer per indexed image layer (mediaType
  INDEX_BLOB_MEDIA_TYPE, annotation LAYER_DIGEST_ANNOTATION = the image layer digest), for a
  version-2 index followed by its windows blob (WINDOWS_BLOB_MEDIA_TYPE, same annotation), and
  subject = the platform manifest. No `org.opencontainers.image.created`: the same image and
  layer indexes always give the same artifact digest, which makes rebuilds idempotent.
* Cache manifest, one per image layer, tagged `layer-sha256-<hex>` in the cache repository:
  the same shape without subject, with the layer's index blob (and its windows blob) and the
  layer digest also as a manifest annotation.

Listing the windows blob in the manifest is what keeps it alive under registry garbage
collection and lets copies (layer cache reuse, profile attach) carry it; readers find it
through the index blob's own `windows` key, not through the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from snapshotter.index.model import (
    ARTIFACT_TYPE,
    INDEX_BLOB_MEDIA_TYPE,
    LAYER_DIGEST_ANNOTATION,
    WINDOWS_BLOB_MEDIA_TYPE,
)
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
    """An image layer, the index blob that describes it and, for a version-2 index, the
    windows blob the index refers to ("" / 0: none)."""

    layer_digest: str
    index_digest: str
    index_size: int
    windows_digest: str = ""
    windows_size: int = 0

    def descriptors(self) -> list[Descriptor]:
        """The manifest layers for this image layer: the index blob, then its windows blob."""
        blobs = [(INDEX_BLOB_MEDIA_TYPE, self.index_digest, self.index_size)]
        if self.windows_digest:
            blobs.append((WINDOWS_BLOB_MEDIA_TYPE, self.windows_digest, self.windows_size))
        return [
            Descriptor(kind, digest, size, annotations={LAYER_DIGEST_ANNOTATION: self.layer_digest})
            for kind, digest, size in blobs
        ]


def manifest_layers(layers: Sequence[IndexedLayer]) -> list[Descriptor]:
    return [desc for layer in layers for desc in layer.descriptors()]


def artifact_manifest(subject: Descriptor, layers: Sequence[IndexedLayer]) -> bytes:
    """The referrer manifest for one platform manifest; layers keep the image's layer order."""
    return referrer_manifest(subject, ARTIFACT_TYPE, manifest_layers(layers))


def cache_manifest(layer: IndexedLayer) -> bytes:
    """The per-layer manifest stored under the layer's tag in the cache repository."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [desc.to_json() for desc in layer.descriptors()],
        "annotations": {LAYER_DIGEST_ANNOTATION: layer.layer_digest},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def indexed_layers(manifest: Manifest) -> list[IndexedLayer]:
    """The (image layer, index blob, windows blob) an artifact or cache manifest lists; a
    windows blob belongs to the index blob of the same layer listed before it. ArtifactError
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
        if not layer_digest:
            continue
        if desc.media_type == INDEX_BLOB_MEDIA_TYPE:
            found.append(IndexedLayer(layer_digest, desc.digest, desc.size))
        elif desc.media_type == WINDOWS_BLOB_MEDIA_TYPE:
            for number in range(len(found) - 1, -1, -1):
                if found[number].layer_digest == layer_digest:
                    found[number] = replace(
                        found[number], windows_digest=desc.digest, windows_size=desc.size
                    )
                    break
    return found


def cached_index_for(manifest: Manifest, layer_digest: str) -> IndexedLayer:
    """The index blob a cache manifest holds for layer_digest. ArtifactError if it holds none
    for that layer: a mistagged or hostile cache entry must not be trusted."""
    for layer in indexed_layers(manifest):
        if layer.layer_digest == layer_digest:
            return layer
    raise ArtifactError(f"cache manifest {manifest.where} holds no index for layer {layer_digest}")
