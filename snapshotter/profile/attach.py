"""Record an image's startup profile from the registry and attach it to the image's lazysnap
index artifact: `lazysnap index build IMAGE --profile CMD`.

The profile is one more blob (PROFILE_MEDIA_TYPE, annotated with its creation time), with the
start-up pack it names (PACK_MEDIA_TYPE: the bytes the command read, profile/pack_build.py; unless
pack=False), in a new artifact manifest that lists the same index blobs (and their windows blobs) as
the image's existing one; discovery reads the index blobs from any artifact and the profile from the
newest. The layer indexes themselves are untouched, so the layer cache keeps sharing them between
images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from snapshotter.fs.blob_source import BlobSpec
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.index.pack import DEFAULT_CHUNK_BYTES, DEFAULT_LEVEL
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.profile.model import ProfilePack, StartupProfile, encode_profile
from snapshotter.profile.pack_build import BuiltPack, build_pack
from snapshotter.profile.record import (
    LayerSource,
    MountedLayer,
    ProfileRecordError,
    Recording,
    image_run_settings,
    record_profile,
    registry_layer_spec,
)
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.manifest import OCI_MANIFEST, Descriptor, Manifest
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import find_referrers, push_referrer, referrer_manifest
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    PACK_MEDIA_TYPE,
    ArtifactBlob,
    ArtifactError,
    IndexedLayer,
    ProfileBlob,
    indexed_layers,
)

log = logging.getLogger("lazysnap.profile")

MAX_CONFIG_BLOB = 4 << 20


class ArtifactSigner(Protocol):
    """Signs what the indexer pushes (snapshotter/indexer/signing.py, with the build's key):
    the artifact a profile builds on must carry its signature, and the new one gets it."""

    def signed(self, repository: Repository, digest: str) -> bool: ...

    def sign(self, repository: Repository, manifest: Descriptor) -> None: ...


@dataclass(frozen=True)
class PackSettings:
    """Whether and how the start-up pack is built (index.pack's defaults)."""

    enabled: bool = True
    level: int = DEFAULT_LEVEL
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class AttachedProfile:
    recording: Recording
    artifact_digest: str
    profile_digest: str
    source: str  # referrers-api | tag-fallback
    pack: BuiltPack | None = None  # its path is gone once attached


def newest_index_artifact(
    client: RegistryClient,
    ref: Reference,
    subject_digest: str,
    signer: ArtifactSigner | None = None,
) -> tuple[Manifest, list[IndexedLayer]] | None:
    """The lazysnap artifact of a platform manifest that discovery would use (with signer: the
    newest one it signed, as the new artifact copies its index blobs and is signed)."""
    found = find_referrers(client, ref.repository, subject_digest, ARTIFACT_TYPE)
    for desc in reversed(found.descriptors):  # later entries are the newer pushes
        try:
            manifest = client.get_manifest(ref.with_digest(desc.digest))
            layers = indexed_layers(manifest)
        except (ArtifactError, RegistryError) as exc:
            log.warning("ignoring referrer %s of %s: %s", desc.digest, subject_digest, exc)
            continue
        if not layers:
            continue
        if signer is not None and not signer.signed(ref.repository, manifest.digest):
            log.info("artifact %s is not signed by the key: not building on it", manifest.digest)
            continue
        return manifest, layers
    return None


def record_and_attach(
    client: RegistryClient,
    ref: Reference,
    subject_digest: str,
    argv: list[str],
    *,
    command_text: str,
    timeout: float,
    access: RegistryAccess,
    signer: ArtifactSigner | None = None,
    pack: PackSettings = PackSettings(),
) -> AttachedProfile:
    """Record the profile of the platform manifest subject_digest of ref and push it. Raises
    ProfileRecordError (or RegistryError) naming what failed; nothing is pushed then."""
    image = client.get_manifest(ref.with_digest(subject_digest))
    if image.is_index:
        raise ProfileRecordError(f"{ref}@{subject_digest} is an index, not an image manifest")
    artifact = newest_index_artifact(client, ref, subject_digest, signer)
    if artifact is None:
        raise ProfileRecordError(
            f"{ref}@{subject_digest} has no lazysnap index: nothing to attach a profile to"
        )
    _, indexed = artifact
    config_desc = image.config
    config = (
        json.loads(client.get_blob(ref.repository, config_desc.digest, MAX_CONFIG_BLOB))
        if config_desc is not None
        else {}
    )
    run = image_run_settings(config if isinstance(config, dict) else {}, argv, timeout)
    by_layer = {i.layer_digest: i for i in indexed}
    built: list[BuiltPack | None] = [None]

    with tempfile.TemporaryDirectory(prefix="lazysnap-layers-") as downloads:

        def make_pack(layers: Sequence[MountedLayer]) -> None:
            built[0] = build_pack(
                [layer for layer in layers if layer.digest in by_layer],  # only lazy layers
                Path(downloads) / "pack",
                level=pack.level,
                chunk_bytes=pack.chunk_bytes,
            )

        sources = [
            LayerSource(
                layer.digest,
                _layer_spec(client, ref, layer, by_layer.get(layer.digest), access, downloads),
            )
            for layer in image.layers
        ]
        recording = record_profile(
            sources,
            run,
            command_text=command_text,
            while_mounted=make_pack if pack.enabled else None,
        )
        profile = recording.profile
        pack_blobs: list[ArtifactBlob] = []
        if built[0] is not None:
            made = built[0]
            client.push_blob(ref.repository, made.path, made.digest)
            log.info(
                "start-up pack %s: %d bytes of %d read, in %.1fs",
                made.digest,
                made.size,
                made.uncompressed_size,
                made.seconds,
            )
            profile = dataclasses.replace(
                profile, pack=ProfilePack(made.digest, made.size, made.sections)
            )
            pack_blobs.append(ArtifactBlob(PACK_MEDIA_TYPE, made.digest, made.size))
    profile_bytes = encode_profile(profile)
    profile_digest = client.push_blob(ref.repository, profile_bytes)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    blobs = [
        *(blob for layer in indexed for blob in layer.blobs()),
        ProfileBlob(profile_digest, len(profile_bytes), created).blob(),
        *pack_blobs,
    ]
    subject = Descriptor(image.media_type, image.digest, len(image.data))
    manifest = referrer_manifest(subject, ARTIFACT_TYPE, [_descriptor(blob) for blob in blobs])
    pushed = push_referrer(client, ref.repository, manifest)
    if signer is not None:
        signer.sign(ref.repository, Descriptor(OCI_MANIFEST, pushed.digest, len(manifest)))
    return AttachedProfile(
        dataclasses.replace(recording, profile=profile),
        pushed.digest,
        profile_digest,
        pushed.source,
        built[0],
    )


def _descriptor(blob: ArtifactBlob) -> Descriptor:
    return Descriptor(blob.media_type, blob.digest, blob.size, annotations=dict(blob.annotations))


def _layer_spec(
    client: RegistryClient,
    ref: Reference,
    layer: Descriptor,
    indexed: IndexedLayer | None,
    access: RegistryAccess,
    downloads: str,
) -> LayerSpec:
    if indexed is not None:
        index_bytes = client.get_blob(ref.repository, indexed.index_digest, MAX_INDEX_BLOB_SIZE)
        return registry_layer_spec(
            str(ref.repository),
            layer.digest,
            layer.size,
            index_bytes,
            access,
        )
    # A layer too small to be indexed: fetch it whole and index the local copy, so it is
    # mounted (and its whiteouts applied) the same way as the others.
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import encode_index
    from snapshotter.index.errors import IndexFormatError

    path = Path(downloads) / layer.digest.replace(":", "-")
    with (
        client.stream_blob(ref.repository, layer.digest, layer.size) as stream,
        open(path, "wb") as out,
    ):
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    try:
        with open(path, "rb") as blob:
            index = build_layer_index(
                blob, media_type=layer.media_type, expected_digest=layer.digest
            )
    except (IndexFormatError, ValueError) as exc:
        raise ProfileRecordError(f"layer {layer.digest} ({layer.media_type}): {exc}") from None
    return LayerSpec(
        blob=BlobSpec("file", str(path), layer.digest, layer.size), index_bytes=encode_index(index)
    )


def profile_summary(profile: StartupProfile) -> str:
    layers = profile.layers()
    return f"{len(profile.entries)} files in {len(layers)} layer{'' if len(layers) == 1 else 's'}"
