"""The lazysnap index artifact: its media types and annotation keys, what it lists, and the one
parser every reader uses (discovery, `lazysnap index build|show|sign`, profile attach).

* Artifact manifest, one per platform manifest: an OCI image manifest (or an ORAS artifact
  manifest) with artifactType ARTIFACT_TYPE, whose subject is the platform manifest. It lists
  one index blob per indexed image layer (INDEX_BLOB_MEDIA_TYPE, annotation
  LAYER_DIGEST_ANNOTATION = the image layer digest), for a version-2 index followed by its
  windows blob (WINDOWS_BLOB_MEDIA_TYPE, same annotation), and optionally a startup profile
  blob (PROFILE_MEDIA_TYPE, annotation PROFILE_CREATED_ANNOTATION = its creation time) with
  the start-up pack it names (PACK_MEDIA_TYPE).
* Cache manifest, one per image layer in the layer cache repository: the same shape without
  subject, holding that layer's index blob (and its windows blob).

The manifest itself comes from the registry client (snapshotter/remote/manifest.py); this module
reads it through the small ManifestLike protocol, so it imports nothing of the project. Building
the manifests to push is snapshotter/indexer/artifact.py's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

ARTIFACT_TYPE = "application/vnd.lazysnap.index.v1+json"
INDEX_BLOB_MEDIA_TYPE = "application/vnd.lazysnap.index.layer.v1"
# The windows blob of a version-2 index blob; listed right after it, same layer annotation.
WINDOWS_BLOB_MEDIA_TYPE = "application/vnd.lazysnap.index.windows.v1"
LAYER_DIGEST_ANNOTATION = "dev.lazysnap.layer.digest"
PROFILE_MEDIA_TYPE = "application/vnd.lazysnap.profile.v1+json"
PROFILE_CREATED_ANNOTATION = "dev.lazysnap.profile.created"  # RFC 3339, picks the newest
# The start-up pack a (version 2) profile names: listed in the same artifact, so the signature
# over the artifact covers it and the registry keeps it; its bytes are checked against the
# profile's chunk digests (snapshotter/index/pack.py).
PACK_MEDIA_TYPE = "application/vnd.lazysnap.pack.v1"


class ArtifactError(ValueError):
    """A manifest found in the registry is not a lazysnap index manifest we can use."""


class BlobLike(Protocol):
    """A descriptor as the registry client parses it (remote.manifest.Descriptor)."""

    @property
    def media_type(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def annotations(self) -> Mapping[str, str]: ...


class ManifestLike(Protocol):
    """A manifest as the registry client parses it (remote.manifest.Manifest): its properties
    raise a ValueError (InvalidManifest) when the document does not have the shape they read."""

    @property
    def where(self) -> str: ...

    @property
    def artifact_type(self) -> str | None: ...

    @property
    def layers(self) -> Sequence[BlobLike]: ...


@dataclass(frozen=True)
class ArtifactBlob:
    """One blob an artifact manifest lists, as pushed (the writer turns it into a descriptor)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexedLayer:
    """An image layer, the index blob that describes it and, for a version-2 index, the
    windows blob the index refers to ("" / 0: none)."""

    layer_digest: str
    index_digest: str
    index_size: int
    windows_digest: str = ""
    windows_size: int = 0

    def blobs(self) -> list[ArtifactBlob]:
        """The manifest layers for this image layer: the index blob, then its windows blob."""
        blobs = [(INDEX_BLOB_MEDIA_TYPE, self.index_digest, self.index_size)]
        if self.windows_digest:
            blobs.append((WINDOWS_BLOB_MEDIA_TYPE, self.windows_digest, self.windows_size))
        return [
            ArtifactBlob(kind, digest, size, {LAYER_DIGEST_ANNOTATION: self.layer_digest})
            for kind, digest, size in blobs
        ]


@dataclass(frozen=True)
class ProfileBlob:
    """A startup profile blob an artifact lists; created is its RFC 3339 creation time ("" when
    the annotation is missing)."""

    digest: str
    size: int
    created: str = ""

    def blob(self) -> ArtifactBlob:
        annotations = {PROFILE_CREATED_ANNOTATION: self.created} if self.created else {}
        return ArtifactBlob(PROFILE_MEDIA_TYPE, self.digest, self.size, annotations)


@dataclass(frozen=True)
class ArtifactContents:
    """What an index manifest lists, in its order."""

    layers: tuple[IndexedLayer, ...] = ()
    profiles: tuple[ProfileBlob, ...] = ()


def artifact_contents(manifest: ManifestLike) -> ArtifactContents:
    """The index blobs (each with its windows blob) and profile blobs a manifest lists; blobs of
    other media types, and index and windows blobs without the layer annotation, are ignored. A
    windows blob belongs to the index blob of the same layer listed before it. The artifactType
    is not checked (see indexed_layers); a document of the wrong shape raises the manifest's own
    error."""
    found: list[IndexedLayer] = []
    profiles: list[ProfileBlob] = []
    for desc in manifest.layers:
        if desc.media_type == PROFILE_MEDIA_TYPE:
            created = desc.annotations.get(PROFILE_CREATED_ANNOTATION, "")
            profiles.append(ProfileBlob(desc.digest, desc.size, created))
            continue
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
    return ArtifactContents(tuple(found), tuple(profiles))


def indexed_layers(manifest: ManifestLike) -> list[IndexedLayer]:
    """The (image layer, index blob, windows blob) an artifact or cache manifest lists.
    ArtifactError if it is not a lazysnap index manifest (artifactType, or a document of the
    wrong shape)."""
    try:
        kind = manifest.artifact_type
        if kind != ARTIFACT_TYPE:
            raise ArtifactError(
                f"manifest {manifest.where}: artifactType is {kind!r}, not {ARTIFACT_TYPE}"
            )
        return list(artifact_contents(manifest).layers)
    except ArtifactError:
        raise
    except ValueError as exc:  # the manifest's InvalidManifest
        raise ArtifactError(str(exc)) from None


def cached_index_for(manifest: ManifestLike, layer_digest: str) -> IndexedLayer:
    """The index blob a cache manifest holds for layer_digest. ArtifactError if it holds none
    for that layer: a mistagged or hostile cache entry must not be trusted."""
    for layer in indexed_layers(manifest):
        if layer.layer_digest == layer_digest:
            return layer
    raise ArtifactError(f"cache manifest {manifest.where} holds no index for layer {layer_digest}")


def newest_profile(current: ProfileBlob | None, found: Sequence[ProfileBlob]) -> ProfileBlob | None:
    """The profile with the latest creation time among current and found (on a tie, the one
    listed last)."""
    for profile in found:
        if current is None or profile.created >= current.created:
            current = profile
    return current
