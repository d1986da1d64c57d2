"""What a pull must do, computed from the image's JSON alone (no I/O).

Mirrors containerd 1.6: chain IDs (image-spec identity.ChainID), the GC reference labels set by
images.SetChildrenMappedLabels/ChildGCLabels, the snapshot labels of
pkg/snapshotters.AppendInfoHandlerWrapper (the `cri.*` keys, image-layers truncated like
getLayers so key+value fit containerd's 4096-byte label limit) and `containerd.io/snapshot.ref`
set by the unpacker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from snapshotter.remote.manifest import MANIFEST_TYPES, Descriptor, Manifest
from snapshotter.vocabulary.labels import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    LAYER_SIZE,
    TARGET_REF,
)

CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
LABEL_MAX = 4096  # containerd labels.Validate: len(key) + len(value)

GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_MANIFEST_PREFIX = "containerd.io/gc.ref.content.m."
GC_LAYER_PREFIX = "containerd.io/gc.ref.content.l."
GC_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."


class ImageFormatError(ValueError):
    """The image's manifest or config is not something containerd could unpack."""


def is_layer_type(media_type: str) -> bool:
    # containerd images.IsLayerType, minus the non-distributable docker foreign layers check
    return media_type.startswith(
        ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
    )


@dataclass(frozen=True)
class LayerStep:
    """One layer to unpack: its blob, where it lands (chain_id) and on what (parent)."""

    position: int
    blob: Descriptor
    diff_id: str
    chain_id: str
    parent: str  # chain ID of the layers below, "" for the first layer
    labels: Mapping[str, str]  # labels for Prepare/Commit of the extraction snapshot


def _load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImageFormatError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ImageFormatError(f"{what} is not a JSON object")
    return doc


def image_layers(manifest: Manifest) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an image manifest, refusing what containerd could not unpack."""
    config = manifest.config
    if config is None:
        raise ImageFormatError(f"manifest {manifest.where} has no config")
    layers = manifest.layers
    for layer in layers:
        if not is_layer_type(layer.media_type):
            raise ImageFormatError(
                f"manifest {manifest.where}: layer {layer.digest} has media type "
                f"{layer.media_type!r}, which is not an image layer"
            )
    return config, layers


def parse_diff_ids(raw: bytes, what: str) -> list[str]:
    doc = _load_json(raw, what)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and d.startswith("sha256:") for d in diff_ids
    ):
        raise ImageFormatError(f"{what} has no rootfs.diff_ids list of sha256 digests")
    return list(diff_ids)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """identity.ChainID for every prefix: C0 = D0, Cn = sha256(C(n-1) + " " + Dn)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            joined = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chain


def image_layers_label(digests: Sequence[str], key: str = CRI_IMAGE_LAYERS) -> str:
    """Comma list of as many digests as fit the label size limit (containerd getLayers)."""
    value = ""
    for digest in digests:
        item = digest if not value else "," + digest
        if len(key) + len(value) + len(item) > LABEL_MAX:
            break
        value += item
    return value


def layer_steps(
    image_ref: str,
    manifest_digest: str,
    config_digest: str,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
) -> list[LayerStep]:
    if len(diff_ids) != len(layers):
        raise ImageFormatError(
            f"number of layers and diffIDs don't match: manifest {manifest_digest} has "
            f"{len(layers)} layers, config {config_digest} has {len(diff_ids)} diff_ids"
        )
    chains = chain_ids(diff_ids)
    digests = [layer.digest for layer in layers]
    steps = []
    for i, layer in enumerate(layers):
        # Layer-descriptor annotations under containerd.io/snapshot/ are inherited, as the
        # unpacker does with snapshots.FilterInheritedLabels(desc.Annotations).
        labels = {
            k: v for k, v in layer.annotations.items() if k.startswith("containerd.io/snapshot/")
        }
        labels.update(
            {
                CRI_IMAGE_REF: image_ref,
                CRI_LAYER_DIGEST: layer.digest,
                CRI_IMAGE_LAYERS: image_layers_label(digests[i:]),
                CRI_MANIFEST_DIGEST: manifest_digest,
                LAYER_SIZE: str(layer.size),
                TARGET_REF: chains[i],
            }
        )
        steps.append(
            LayerStep(
                position=i,
                blob=layer,
                diff_id=diff_ids[i],
                chain_id=chains[i],
                parent=chains[i - 1] if i else "",
                labels=labels,
            )
        )
    return steps


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """containerd ChildGCLabels numbering: config is unnumbered, manifests m.<i>, layers l.<i>,
    anything else content.<i> (counters per prefix)."""
    counters: dict[str, int] = {}
    labels: dict[str, str] = {}
    for child in children:
        if child.media_type in CONFIG_TYPES:
            labels[GC_CONFIG] = child.digest
            continue
        if child.media_type in MANIFEST_TYPES:
            prefix = GC_MANIFEST_PREFIX
        elif is_layer_type(child.media_type):
            prefix = GC_LAYER_PREFIX
        else:
            prefix = "containerd.io/gc.ref.content."
        n = counters.get(prefix, 0)
        counters[prefix] = n + 1
        labels[f"{prefix}{n}"] = child.digest
    return labels


def snapshot_gc_label(snapshotter: str, top_chain_id: str) -> dict[str, str]:
    return {f"{GC_SNAPSHOT_PREFIX}{snapshotter}": top_chain_id}


def distribution_source_label(
    registry_host: str, repository: str, existing: Mapping[str, str] | None = None
) -> dict[str, str]:
    """containerd's docker.AppendDistributionSourceLabel: lets a later push mount the blob
    cross-repo instead of uploading it; values merge as a comma list."""
    key = DISTRIBUTION_SOURCE_PREFIX + registry_host
    current = [r for r in (existing or {}).get(key, "").split(",") if r]
    if repository not in current:
        current.append(repository)
    return {key: ",".join(current)}
