"""The test session's index signing key: index builds sign with it and the daemons trust it,
so the suite runs the secure default (`[trust] mode = "signed"`) rather than opting out.

`lazysnap index build` and `accel serve` read their --sign-key default from $LAZYSNAP_SIGN_KEY,
so setting it once covers every build a test runs, in-process or as a subprocess."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from snapshotter.indexer.command import SIGN_KEY_ENV
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import OCI_MANIFEST, Descriptor, sha256_digest
from snapshotter.remote.reference import Repository
from snapshotter.trust.keys import SigningKey, load_signing_key, write_key_pair
from snapshotter.trust.policy import TrustMode, TrustPolicy


@dataclass(frozen=True)
class SigningKeys:
    private: Path  # index.key (PKCS#8 PEM, 0600)
    public: Path  # index.pub
    key_id: str


def make_keys(directory: Path) -> SigningKeys:
    private, public, key = write_key_pair(str(directory), overwrite=True)
    return SigningKeys(Path(private), Path(public), key.public.key_id)


def sign_builds_with(keys: SigningKeys) -> None:
    """Every later `index build` / `accel serve` of this process and its children signs."""
    os.environ[SIGN_KEY_ENV] = str(keys.private)


def session_trust_policy() -> TrustPolicy:
    """What a daemon of this session trusts: the key builds sign with ($LAZYSNAP_SIGN_KEY's
    public half). For tests that construct IndexDiscovery themselves."""
    return TrustPolicy(TrustMode.SIGNED, (session_signing_key().public,))


def session_signing_key() -> SigningKey:
    path = os.environ.get(SIGN_KEY_ENV)
    if not path:
        raise RuntimeError(
            f"${SIGN_KEY_ENV} is not set: the session signing key fixture did not run"
        )
    return load_signing_key(path)


def sign_pushed(
    client: RegistryClient, repository: Repository, manifest: bytes, key: SigningKey | None = None
) -> str:
    """Sign a manifest pushed to repository (the session key unless key), as `index build
    --sign-key` signs its artifacts; the signature manifest's digest."""
    from snapshotter.indexer.signing import sign_manifest

    described = Descriptor(OCI_MANIFEST, sha256_digest(manifest), len(manifest))
    signature = sign_manifest(client, repository, described, key or session_signing_key())
    assert signature is not None, f"{described.digest} was already signed"
    return signature
