"""Signing what the indexer pushes: index artifact manifests (what nodes verify, see
snapshotter/trust) and layer cache entries (so a build that signs only reuses cache entries the
same key signed: whoever can write the cache repository cannot get a forged index signed).

A manifest already carrying a valid signature by the key is not signed again (an ECDSA
signature differs every time: re-signing would add a signature manifest per build)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import Descriptor
from snapshotter.remote.reference import Repository
from snapshotter.remote.signatures import find_signatures, push_signature
from snapshotter.trust import simplesign
from snapshotter.trust.keys import SigningKey
from snapshotter.trust.policy import TrustMode, TrustPolicy

log = logging.getLogger(__name__)


def signed_by(client: RegistryClient, repo: Repository, digest: str, key: SigningKey) -> bool:
    """Whether manifest digest in repo carries a valid signature by key."""
    found = find_signatures(client, repo, digest)
    return TrustPolicy(TrustMode.SIGNED, (key.public,)).decide(digest, found).trusted


def sign_manifest(
    client: RegistryClient, repo: Repository, manifest: Descriptor, key: SigningKey
) -> str | None:
    """Sign manifest (in repo) with key unless it already is; the pushed signature manifest's
    digest, or None when a valid signature by key was there."""
    if signed_by(client, repo, manifest.digest, key):
        log.debug("%s@%s is already signed by key %s", repo, manifest.digest, key.public.key_id)
        return None
    payload = simplesign.payload(str(repo), manifest.digest)
    pushed = push_signature(client, repo, manifest, payload, simplesign.sign(key, payload))
    return pushed.digest


@dataclass(frozen=True)
class KeySigner:
    """Signing with one key in the registry of client: what profile attach is handed (it signs
    the artifact it pushes, and builds only on artifacts the key signed)."""

    client: RegistryClient
    key: SigningKey

    def signed(self, repository: Repository, digest: str) -> bool:
        return signed_by(self.client, repository, digest, self.key)

    def sign(self, repository: Repository, manifest: Descriptor) -> None:
        sign_manifest(self.client, repository, manifest, self.key)
