"""`lazysnap index sign IMAGE`: sign the index artifacts an image already has (migration for
images indexed before signing, or by a builder without the key).

It signs the newest lazysnap artifact of each platform manifest: the one nodes used until now.
It vouches for whatever the registry holds at that moment, made by whoever could push there;
`index build --sign-key` instead re-derives the index from the layer bytes (reusing only cache
entries the key signed) and signs what it built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from snapshotter.indexer import signing
from snapshotter.indexer.build import BuildOptions, resolve_targets
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.manifest import Descriptor
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import find_referrers
from snapshotter.trust.keys import SigningKey
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, ArtifactError, indexed_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedTarget:
    platform: str
    subject_digest: str
    artifact_digest: str | None  # None: the platform manifest has no lazysnap index
    signature_digest: str | None  # None: there was one by this key already (or no artifact)


def sign_image_indexes(
    client: RegistryClient, image: str, key: SigningKey, options: BuildOptions
) -> list[SignedTarget]:
    ref = Reference.parse(image)
    targets, skipped = resolve_targets(client, ref, options)
    for warning in skipped:
        log.warning("%s", warning)
    signed: list[SignedTarget] = []
    for target in targets:
        found = find_referrers(client, ref.repository, target.subject.digest, ARTIFACT_TYPE)
        artifact: Descriptor | None = None
        for desc in reversed(found.descriptors):  # later entries are the newer pushes
            try:
                manifest = client.get_manifest(ref.with_digest(desc.digest))
                if indexed_layers(manifest):
                    artifact = Descriptor(manifest.media_type, manifest.digest, len(manifest.data))
                    break
            except (ArtifactError, RegistryError) as exc:
                log.warning("ignoring referrer %s of %s: %s", desc.digest, target.subject, exc)
        if artifact is None:
            signed.append(SignedTarget(target.platform, target.subject.digest, None, None))
            continue
        signature = signing.sign_manifest(client, ref.repository, artifact, key)
        signed.append(
            SignedTarget(target.platform, target.subject.digest, artifact.digest, signature)
        )
    return signed
