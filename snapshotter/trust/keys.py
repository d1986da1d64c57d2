"""PEM keys for index signatures: ECDSA P-256 only (what cosign makes and verifies with --key).

* signing key: unencrypted PKCS#8 (`-----BEGIN PRIVATE KEY-----`), or SEC1 (`EC PRIVATE KEY`);
  cosign's own encrypted `ENCRYPTED SIGSTORE PRIVATE KEY` is refused with how to convert it.
* public key: SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, cosign's cosign.pub).

A key is named in logs by its id: the first 16 hex digits of SHA-256 over its DER
SubjectPublicKeyInfo, so the node's log and `lazysnap trust keygen` show the same name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PRIVATE_KEY_FILE = "index.key"
PUBLIC_KEY_FILE = "index.pub"
MAX_KEY_FILE_BYTES = 64 << 10
_COSIGN_ENCRYPTED = b"ENCRYPTED SIGSTORE PRIVATE KEY"
_COSIGN_ENCRYPTED_OLD = b"ENCRYPTED COSIGN PRIVATE KEY"


class TrustKeyError(ValueError):
    """A key file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class PublicKey:
    key: ec.EllipticCurvePublicKey
    key_id: str
    path: str  # where it was read from ("" when made in memory)


@dataclass(frozen=True)
class SigningKey:
    key: ec.EllipticCurvePrivateKey
    public: PublicKey


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def public_key_of(key: ec.EllipticCurvePublicKey, path: str = "") -> PublicKey:
    return PublicKey(key, key_id(key), path)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise TrustKeyError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise TrustKeyError(f"{what} {path}: larger than {MAX_KEY_FILE_BYTES} bytes: not a key")
    return data


def _require_p256(key: object, path: str, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        raise TrustKeyError(
            f"{what} {path}: a {type(key).__name__.lstrip('_')}, not an ECDSA P-256 key "
            "(only P-256, as cosign generate-key-pair makes, is accepted)"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise TrustKeyError(
            f"{what} {path}: ECDSA on curve {key.curve.name}, not P-256 (secp256r1)"
        )


def load_signing_key(path: str) -> SigningKey:
    """The private key in path. TrustKeyError naming the path when it is not a usable one."""
    what = "signing key"
    data = _read(path, what)
    if _COSIGN_ENCRYPTED in data or _COSIGN_ENCRYPTED_OLD in data:
        raise TrustKeyError(
            f"{what} {path}: a cosign-encrypted key (scrypt + secretbox), which lazysnap does "
            "not read: make a pair with `lazysnap trust keygen` (unencrypted PKCS#8) and, to sign "
            "with cosign too, import it there with `cosign import-key-pair --key index.key`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TrustKeyError(
            f"{what} {path}: the key is password-protected: give an unencrypted PKCS#8 key "
            "(keep it readable by its owner only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustKeyError(f"{what} {path}: not a PEM private key: {exc}") from None
    _require_p256(key, path, what)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return SigningKey(key, public_key_of(key.public_key(), path))


def load_public_key(path: str) -> PublicKey:
    """The public key in path. TrustKeyError naming the path when it is not a usable one."""
    what = "public key"
    data = _read(path, what)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustKeyError(
            f"{what} {path}: not a PEM public key (-----BEGIN PUBLIC KEY-----): {exc}"
        ) from None
    _require_p256(key, path, what)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return public_key_of(key, path)


def load_public_keys(paths: Iterable[str]) -> tuple[PublicKey, ...]:
    """Every key of paths: a file, or a directory whose *.pub files are read (in name order;
    a directory without any is an error, as it is surely not what was meant)."""
    keys: list[PublicKey] = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(p for p in Path(path).glob("*.pub") if p.is_file())
            if not files:
                raise TrustKeyError(f"public key directory {path}: no *.pub file in it")
            keys.extend(load_public_key(str(p)) for p in files)
        else:
            keys.append(load_public_key(path))
    return tuple(keys)


def generate_signing_key() -> SigningKey:
    key = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(key, public_key_of(key.public_key()))


def private_pem(key: SigningKey) -> bytes:
    return key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PublicKey) -> bytes:
    return key.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_key_pair(directory: str, *, overwrite: bool = False) -> tuple[str, str, SigningKey]:
    """A new key pair as DIRECTORY/index.key (mode 0600, created so: never readable by others
    even for a moment) and DIRECTORY/index.pub. Refuses to replace existing files unless
    overwrite. Returns (private path, public path, key)."""
    os.makedirs(directory, exist_ok=True)
    private_path = os.path.join(directory, PRIVATE_KEY_FILE)
    public_path = os.path.join(directory, PUBLIC_KEY_FILE)
    if not overwrite:
        for path in (private_path, public_path):
            if os.path.exists(path):
                raise TrustKeyError(f"{path} exists: not replacing a key (remove it first)")
    key = generate_signing_key()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(private_pem(key))
    with open(public_path, "wb") as f:
        f.write(public_pem(key.public))
    return private_path, public_path, key
