"""Snapshot label keys: what containerd's pullers put on a Prepare, and what the core adds.

containerd forwards these on Prepare of an unpack target: CRI's
`containerd.io/snapshot/cri.*` (when disable_snapshot_annotations = false), stargz's
`containerd.io/snapshot/remote/stargz.*` (ctr-remote rpull, nerdctl) and the target name in
`containerd.io/snapshot.ref`. `lazysnap pull` sets the CRI keys, so all reach one parser
(snapshotter/source/labels.py). The core marks a snapshot it mounted lazily with REMOTE_LABEL.
"""

from __future__ import annotations

from collections.abc import Mapping

# The chain ID an unpack's snapshot is committed as: a Prepare naming one asks for a lazy layer.
TARGET_REF = "containerd.io/snapshot.ref"
# Set by the core on a committed snapshot whose layer is mounted lazily (value REMOTE_LABEL_VALUE).
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote"

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

# Where the pullers put the compressed layer digest (CRI, ctr-remote), in the order read.
LAYER_DIGEST_LABELS = (CRI_LAYER_DIGEST, STARGZ_DIGEST)


def layer_digest_of(labels: Mapping[str, str]) -> str:
    """The compressed layer digest the labels name; "" when they name none."""
    for key in LAYER_DIGEST_LABELS:
        if labels.get(key):
            return labels[key]
    return ""


def is_remote(labels: Mapping[str, str]) -> bool:
    """Whether a snapshot's labels mark it as mounted lazily by the core."""
    return labels.get(REMOTE_LABEL) == REMOTE_LABEL_VALUE
