"""The OCI manifests lazysnap pushes, built byte-for-byte deterministically (their shape and the
parser that reads them back: snapshotter/vocabulary/artifact.py).

* Artifact manifest, one per platform manifest: the referrer manifest of the platform manifest
  with one layer per indexed image layer (and its windows blob). No
  `org.opencontainers.image.created`: the same image and layer indexes always give the same
  artifact digest, which makes rebuilds idempotent.
* Cache manifest, one per image layer, tagged `layer-sha256-<hex>` in the cache repository:
  the same shape without subject, and the layer digest also as a manifest annotation.

Listing the windows blob in the manifest is what keeps it alive under registry garbage
collection and lets copies (layer cache reuse, profile attach) carry it; readers find it
through the index blob's own `windows` key, not through the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from snapshotter.remote.manifest import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    Descriptor,
)
from snapshotter.remote.referrers import referrer_manifest
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    LAYER_DIGEST_ANNOTATION,
    ArtifactBlob,
    IndexedLayer,
)

EMPTY_CONFIG = Descriptor(OCI_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))


def descriptor(blob: ArtifactBlob) -> Descriptor:
    return Descriptor(blob.media_type, blob.digest, blob.size, annotations=dict(blob.annotations))


def manifest_layers(layers: Sequence[IndexedLayer]) -> list[Descriptor]:
    return [descriptor(blob) for layer in layers for blob in layer.blobs()]


def artifact_manifest(
    subject: Descriptor, layers: Sequence[IndexedLayer], extra: Sequence[ArtifactBlob] = ()
) -> bytes:
    """The referrer manifest for one platform manifest; layers keep the image's layer order,
    extra blobs (the static start-up profile) follow them."""
    blobs = [*manifest_layers(layers), *(descriptor(blob) for blob in extra)]
    return referrer_manifest(subject, ARTIFACT_TYPE, blobs)


def cache_manifest(layer: IndexedLayer) -> bytes:
    """The per-layer manifest stored under the layer's tag in the cache repository."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [desc.to_json() for desc in manifest_layers([layer])],
        "annotations": {LAYER_DIGEST_ANNOTATION: layer.layer_digest},
    }
    return json.dumps(doc, separators=(",", ":")).encode()
