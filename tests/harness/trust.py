"""The test session's index signing key: index builds sign with it and the daemons trust it,
so the suite runs the secure default (`[trust] mode = "signed"`) rather than opting out.

`lazysnap index build` and `accel serve` read their --sign-key default from $LAZYSNAP_SIGN_KEY,
so setting it once covers every build a test runs, in-process or as a subprocess."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from snapshotter.indexer.command import SIGN_KEY_ENV
from snapshotter.trust.keys import write_key_pair
from snapshotter.trust.policy import TrustPolicy


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
    from snapshotter.trust.keys import load_signing_key
    from snapshotter.trust.policy import TrustMode

    path = os.environ.get(SIGN_KEY_ENV)
    if not path:
        raise RuntimeError(
            f"${SIGN_KEY_ENV} is not set: the session signing key fixture did not run"
        )
    return TrustPolicy(TrustMode.SIGNED, (load_signing_key(path).public,))
