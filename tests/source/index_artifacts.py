"""Images and lazysnap index artifacts made in-process for discovery tests: uncompressed layers,
indexes built with a chosen span size (so two artifacts can hold different indexes of one
layer) and an optional startup profile, pushed to the real registry as the indexer and
`index build --profile` push theirs (referrer manifest, tag fallback on docker-registry)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.images import (
    MANIFEST_TYPE,
    PushedImage,
    directory,
    file,
    layer_tar,
    push,
    write_oci_layout,
)
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import encode_index
from snapshotter.indexer.artifact import manifest_layers
from snapshotter.profile.model import ProfileEntry, StartupProfile, encode_profile
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import EMPTY_JSON, Descriptor
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import push_referrer, referrer_manifest
from snapshotter.vocabulary.artifact import (
    ARTIFACT_TYPE,
    PROFILE_CREATED_ANNOTATION,
    PROFILE_MEDIA_TYPE,
    IndexedLayer,
)

FILES_PER_LAYER = 3
FILE_SIZE = 150_000


@dataclass(frozen=True)
class PushedArtifact:
    digest: str
    index_bytes: dict[str, bytes]  # image layer digest -> its index blob in this artifact
    profile_digest: str = ""


def content(repository: str, name: str) -> bytes:
    """What file `name` holds in push_image's image of repository (unique per repository, so
    each test's layers are its own)."""
    line = f"{repository} {name}\n".encode()
    return (line * (FILE_SIZE // len(line) + 1))[:FILE_SIZE]


def push_image(registry_host: str, repository: str, workdir: Path, layers: int) -> PushedImage:
    """An image of `layers` uncompressed layers, layer n holding l<n>/f0..f2 (see content)."""
    tars = [
        layer_tar(
            [directory(f"l{n}")]
            + [
                file(f"l{n}/f{i}", content(repository, f"l{n}/f{i}"))
                for i in range(FILES_PER_LAYER)
            ]
        )
        for n in range(layers)
    ]
    built = write_oci_layout(workdir / repository.replace("/", "-"), "v1", tars, compression="none")
    return push(built, registry_host, repository)


def profile_of(image: PushedImage, names: Sequence[str]) -> StartupProfile:
    """A profile reading `names` ("l<n>/f<i>") in order, each from its layer n."""
    layers = [layer.digest for layer in image.layers]
    return StartupProfile(
        tuple(ProfileEntry(layers[int(name[1 : name.index("/")])], name) for name in names),
        command="/bin/true",
    )


def push_artifact(
    client: RegistryClient,
    image: PushedImage,
    *,
    span_size: int,
    layer_digests: Sequence[str] | None = None,
    profile: bytes | None = None,
    created: str = "",
) -> PushedArtifact:
    """Index the image's layers (all, or layer_digests) with span_size, push the index blobs
    and `profile` (its bytes, pushed as given) and an artifact listing them whose subject is the
    image's manifest. `created` annotates the profile (the newest wins in discovery)."""
    repository = Reference.parse(image.reference).repository
    blobs = image.built.layout / "blobs" / "sha256"
    wanted = set(layer_digests) if layer_digests is not None else None
    indexed: list[IndexedLayer] = []
    index_bytes: dict[str, bytes] = {}
    for layer in image.layers:
        if wanted is not None and layer.digest not in wanted:
            continue
        data = (blobs / layer.digest.split(":", 1)[1]).read_bytes()
        index = build_layer_index(
            io.BytesIO(data),
            media_type=layer.media_type,
            span_size=span_size,
            expected_digest=layer.digest,
        )
        encoded = encode_index(index)
        digest = client.push_blob(repository, encoded)
        indexed.append(IndexedLayer(layer.digest, digest, len(encoded)))
        index_bytes[layer.digest] = encoded
    extra: list[Descriptor] = []
    profile_digest = ""
    if profile is not None:
        profile_digest = client.push_blob(repository, profile)
        annotations = {PROFILE_CREATED_ANNOTATION: created} if created else {}
        extra.append(Descriptor(PROFILE_MEDIA_TYPE, profile_digest, len(profile), annotations))
    client.push_blob(repository, EMPTY_JSON)  # the artifact's config
    manifest = (blobs / image.built.manifest_digest.split(":", 1)[1]).read_bytes()
    subject = Descriptor(MANIFEST_TYPE, image.built.manifest_digest, len(manifest))
    artifact = referrer_manifest(subject, ARTIFACT_TYPE, [*manifest_layers(indexed), *extra])
    pushed = push_referrer(client, repository, artifact, verify_delay=0.0)
    return PushedArtifact(pushed.digest, index_bytes, profile_digest)


def encoded_profile(image: PushedImage, names: Sequence[str]) -> bytes:
    return encode_profile(profile_of(image, names))
