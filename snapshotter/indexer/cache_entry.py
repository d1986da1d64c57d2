"""The two shapes of a layer cache entry (the root under tag `layer-sha256-<hex>`), read and
rewritten. Pure: manifests in, bytes out; layer_cache does the registry I/O.

* A **manifest** entry is one variant: an OCI image manifest (artifactType ARTIFACT_TYPE, empty
  config) whose layers are the index blob and, for a format-2 index, its windows blob, all
  annotated with the layer digest. Written since span sizes were recorded, its annotations also
  say the variant's span size and index format version (VariantKey); older entries lack them.
* An **index** entry is an OCI index whose manifests are such variant manifests (of the same
  layer, each with other span size or format version), their descriptors carrying the same
  annotations as hints, so a reader fetches only the variant it can use.

Shape rules when a build stores a variant (updated_root): no entry -> a manifest; a manifest
entry whose one variant has the same key (or is unusable) -> replaced in place, still a
manifest; a second key -> an index of both; an index stays an index (a variant of the same key
replaced where it was, a new key appended; at most MAX_VARIANTS, oldest dropped first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from snapshotter.index.model import SUPPORTED_VERSIONS
from snapshotter.indexer.artifact import EMPTY_CONFIG, manifest_layers
from snapshotter.remote.errors import InvalidManifest
from snapshotter.remote.manifest import (
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
)
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, LAYER_DIGEST_ANNOTATION, IndexedLayer

SPAN_SIZE_ANNOTATION = "dev.lazysnap.index.span-size"
FORMAT_VERSION_ANNOTATION = "dev.lazysnap.index.format-version"
# Variants kept in one index entry: bounds the entry and what a reader may try.
MAX_VARIANTS = 8
_NUMBER = re.compile(r"[0-9]{1,12}")  # ASCII digits only, bounded (annotations are anyone's)

Shape = Literal["manifest", "index"]


class CacheEntryError(ValueError):
    """A cache entry root that is neither a variant manifest nor an index of them."""


@dataclass(frozen=True, order=True)
class VariantKey:
    """What tells variants of one layer's index apart: the span size it was built with and its
    index format version."""

    span_size: int
    format_version: int

    def annotations(self) -> dict[str, str]:
        return {
            SPAN_SIZE_ANNOTATION: str(self.span_size),
            FORMAT_VERSION_ANNOTATION: str(self.format_version),
        }

    @classmethod
    def from_annotations(cls, annotations: dict[str, str]) -> VariantKey | None:
        """The key the annotations state, None when they state none (an older writer) or
        state it malformed."""
        span, version = (
            annotations.get(SPAN_SIZE_ANNOTATION),
            annotations.get(FORMAT_VERSION_ANNOTATION),
        )
        if span is None or version is None:
            return None
        if not (_NUMBER.fullmatch(span) and _NUMBER.fullmatch(version)):
            return None
        return cls(int(span), int(version))

    def problem(self, span_size: int) -> str | None:
        """Why this variant does not fit a build asking span_size, or None."""
        if self.format_version not in SUPPORTED_VERSIONS:
            return f"index format version {self.format_version} is not one this version reads"
        if self.span_size != span_size:
            return f"span size {self.span_size}, the build asks {span_size}"
        return None

    def __str__(self) -> str:
        return f"span size {self.span_size}, format {self.format_version}"


@dataclass(frozen=True)
class Variant:
    """One variant an entry lists: the variant manifest's descriptor and the key its
    annotations state (for an index entry: the descriptor's hint; None: not stated)."""

    descriptor: Descriptor
    key: VariantKey | None


@dataclass(frozen=True)
class CacheEntry:
    root: Manifest
    shape: Shape
    variants: tuple[Variant, ...]

    def candidates(self, span_size: int) -> list[Variant]:
        """The variants worth fetching for a build asking span_size, best first: stated keys
        that fit (highest format version first), then those that state none."""
        fitting = [
            v for v in self.variants if v.key is not None and v.key.problem(span_size) is None
        ]
        fitting.sort(key=lambda v: -v.key.format_version if v.key else 0)
        return fitting + [v for v in self.variants if v.key is None]

    def keys(self) -> list[str]:
        return [str(v.key) if v.key else "unstated" for v in self.variants]


def parse_entry(root: Manifest) -> CacheEntry:
    """The variants of an entry root. CacheEntryError when it is neither shape."""
    try:
        if root.is_index:
            listed = [d for d in root.manifests if d.media_type in MANIFEST_TYPES]
            if not listed:
                raise CacheEntryError(f"cache entry {root.where}: an index listing no manifest")
            variants = tuple(Variant(d, VariantKey.from_annotations(d.annotations)) for d in listed)
            return CacheEntry(root, "index", variants[-MAX_VARIANTS:])
        if root.media_type not in MANIFEST_TYPES:
            raise CacheEntryError(f"cache entry {root.where}: media type {root.media_type}")
        annotations = root.annotations
    except InvalidManifest as exc:
        raise CacheEntryError(str(exc)) from None
    described = Descriptor(OCI_MANIFEST, root.digest, len(root.data), annotations=annotations)
    return CacheEntry(
        root, "manifest", (Variant(described, VariantKey.from_annotations(annotations)),)
    )


def variant_manifest(layer: IndexedLayer, key: VariantKey) -> bytes:
    """The manifest of one variant: deterministic, so the same index stores the same bytes."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [desc.to_json() for desc in manifest_layers([layer])],
        "annotations": {LAYER_DIGEST_ANNOTATION: layer.layer_digest, **key.annotations()},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def variant_descriptor(
    layer_digest: str, manifest: bytes, digest: str, key: VariantKey
) -> Descriptor:
    """How an index entry lists a variant manifest (annotations: the hints readers go by)."""
    return Descriptor(
        OCI_MANIFEST,
        digest,
        len(manifest),
        annotations={LAYER_DIGEST_ANNOTATION: layer_digest, **key.annotations()},
        artifact_type=ARTIFACT_TYPE,
    )


def index_root(layer_digest: str, variants: list[Descriptor]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": ARTIFACT_TYPE,
        "manifests": [d.to_json() for d in variants],
        "annotations": {LAYER_DIGEST_ANNOTATION: layer_digest},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class NewRoot:
    """What to PUT under the tag: data of media_type (an index needs its variant manifests
    pushed first: they are all in the repository already, but for the new one)."""

    data: bytes
    media_type: str
    shape: Shape


def updated_root(
    shape: Shape | None,
    others: list[Variant],
    layer_digest: str,
    new: Descriptor,
    new_manifest: bytes,
    key: VariantKey,
) -> NewRoot:
    """The entry root after storing variant `new` (manifest bytes new_manifest) under key.
    shape: the entry's now (None: no entry); others: its variants to keep, each of this layer
    with a known key (the caller resolves or drops the rest). One of the same key is replaced,
    in its place."""
    listed: list[Descriptor] = []
    for variant in others:
        if variant.key is None:
            continue
        if variant.key != key:
            listed.append(_hinted(variant.descriptor, layer_digest, variant.key))
        elif new not in listed:
            listed.append(new)
    if new not in listed:
        listed.append(new)
    if shape is None or (shape == "manifest" and len(listed) == 1):
        return NewRoot(new_manifest, OCI_MANIFEST, "manifest")
    while len(listed) > MAX_VARIANTS:  # the oldest go first
        listed.remove(next(d for d in listed if d is not new))
    return NewRoot(index_root(layer_digest, listed), OCI_INDEX, "index")


def _hinted(descriptor: Descriptor, layer_digest: str, key: VariantKey) -> Descriptor:
    """A kept variant's descriptor, with the hints a reader goes by (a variant that was the
    root of a manifest entry had none)."""
    return Descriptor(
        descriptor.media_type or OCI_MANIFEST,
        descriptor.digest,
        descriptor.size,
        annotations={LAYER_DIGEST_ANNOTATION: layer_digest, **key.annotations()},
        artifact_type=ARTIFACT_TYPE,
    )
