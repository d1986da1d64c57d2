"""Which image layer a Prepare call is about, read from the labels containerd passes.

The CRI, stargz and lazysnap-pull dialects (their keys: snapshotter/vocabulary/labels.py) all
reach this one parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snapshotter.vocabulary.labels import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    LAYER_SIZE,
    MANIFEST_DIGEST_FALLBACK,
    STARGZ_DIGEST,
    STARGZ_LAYERS,
    STARGZ_REFERENCE,
    TARGET_REF,
)


class LabelError(ValueError):
    """The labels do not name an image layer (so the layer cannot be lazy)."""


@dataclass(frozen=True)
class LayerRequest:
    target: str  # chain ID the snapshot is committed under
    image_ref: str
    manifest_digest: str  # "" when the labels do not say (resolved from image_ref then)
    layer_digest: str
    following_layers: tuple[str, ...]  # this layer and the next ones, for prefetch planning
    layer_size: int | None = None  # compressed bytes, when the labels say (a hint only)


def _first(labels: Mapping[str, str], *keys: str) -> str:
    for key in keys:
        value = labels.get(key, "")
        if value:
            return value
    return ""


def parse_layer_request(labels: Mapping[str, str]) -> LayerRequest:
    target = labels.get(TARGET_REF, "")
    if not target:
        raise LabelError(f"no {TARGET_REF} label: not an unpack of an image layer")
    image_ref = _first(labels, CRI_IMAGE_REF, STARGZ_REFERENCE)
    layer_digest = _first(labels, CRI_LAYER_DIGEST, STARGZ_DIGEST)
    if not image_ref or not layer_digest:
        raise LabelError(
            "labels name no image and layer (need containerd.io/snapshot/cri.image-ref and "
            "cri.layer-digest, or the stargz.reference/stargz.digest pair); with CRI set "
            "disable_snapshot_annotations = false, or pull with `lazysnap pull`"
        )
    if not layer_digest.startswith("sha256:"):
        raise LabelError(f"layer digest {layer_digest!r} is not a sha256 digest")
    layers = _first(labels, CRI_IMAGE_LAYERS, STARGZ_LAYERS)
    return LayerRequest(
        target=target,
        image_ref=image_ref,
        manifest_digest=_first(labels, CRI_MANIFEST_DIGEST, MANIFEST_DIGEST_FALLBACK),
        layer_digest=layer_digest,
        following_layers=tuple(d for d in layers.split(",") if d),
        layer_size=int(size) if (size := labels.get(LAYER_SIZE, "")).isdigit() else None,
    )
