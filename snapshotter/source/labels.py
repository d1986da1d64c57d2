"""Which image layer a Prepare call is about, read from the labels containerd passes.

containerd forwards these on Prepare of an unpack target: CRI's
`containerd.io/snapshot/cri.*` (when disable_snapshot_annotations = false), stargz's
`containerd.io/snapshot/remote/stargz.*` (ctr-remote rpull, nerdctl) and the target name in
`containerd.io/snapshot.ref`. `lazysnap pull` sets the CRI keys, so all three reach one parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TARGET_REF = "containerd.io/snapshot.ref"
REMOTE_LABEL = "containerd.io/snapshot/remote"

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
# stargz labels carry no manifest digest; lazysnap pull adds it under this key.
MANIFEST_DIGEST_FALLBACK = "containerd.io/snapshot/remote/lazysnap.manifest-digest"
# The compressed size of the layer blob, set by `lazysnap pull`: a layer under min_layer_size
# then falls back at once, without looking up the image's indexes in the registry.
LAYER_SIZE = "containerd.io/snapshot/remote/lazysnap.layer-size"


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
