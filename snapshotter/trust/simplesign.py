"""cosign's signature of a manifest digest: the "simple signing" JSON payload, signed with ECDSA
P-256 over its SHA-256 (ASN.1 DER signature, base64 in the manifest annotation).

    {"critical": {"identity": {"docker-reference": "<registry>/<repo>"},
                  "image": {"docker-manifest-digest": "sha256:<signed manifest>"},
                  "type": "cosign container image signature"},
     "optional": null}

The docker-reference is informational: an index artifact is bound to content-addressed layers,
so its signature holds in any repository it is copied to. What binds a signature to one
artifact is docker-manifest-digest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from snapshotter.trust.keys import PublicKey, SigningKey

PAYLOAD_TYPE = "cosign container image signature"
MAX_SIGNATURE_TEXT = 4096  # a DER P-256 signature is at most 72 bytes (96 in base64)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class Refusal(StrEnum):
    """Why a signature does not vouch for an artifact, from the least to the most telling."""

    NO_SIGNATURE = "no signature"
    CORRUPT = "corrupt signature"
    UNTRUSTED_KEY = "signature by an untrusted key"
    UNREADABLE_PAYLOAD = "unreadable payload"
    OTHER_ARTIFACT = "signature over a different artifact"


@dataclass(frozen=True)
class Checked:
    """One signature, checked: key_id set when it vouches for the artifact, else refusal."""

    key_id: str = ""
    refusal: Refusal | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.refusal is None


def payload(docker_reference: str, manifest_digest: str) -> bytes:
    """The simple signing payload for manifest_digest (compact JSON, as cosign writes it)."""
    if not _DIGEST.fullmatch(manifest_digest):
        raise ValueError(f"cannot sign {manifest_digest!r}: not sha256:<64 hex>")
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def signed_digest(data: bytes) -> str:
    """The manifest digest a payload vouches for. ValueError saying why it is not a payload
    of a cosign container image signature."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("payload is not JSON") from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        raise ValueError("payload has no 'critical' object")
    kind = critical.get("type")
    if kind != PAYLOAD_TYPE:
        raise ValueError(f"payload type is {kind!r}, not {PAYLOAD_TYPE!r}")
    image = critical.get("image")
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"payload docker-manifest-digest is {digest!r}, not sha256:<64 hex>")
    return digest


def sign(key: SigningKey, data: bytes) -> str:
    """base64 of the DER ECDSA P-256 signature over SHA-256 of data (cosign's annotation)."""
    return base64.b64encode(key.key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def check(
    artifact_digest: str, data: bytes, signature_text: str, keys: tuple[PublicKey, ...]
) -> Checked:
    """Does (payload data, signature) vouch for artifact_digest under one of keys? The
    signature is checked before the payload is read: an unsigned payload says nothing."""
    if len(signature_text) > MAX_SIGNATURE_TEXT:
        return Checked(refusal=Refusal.CORRUPT, detail=f"{len(signature_text)} characters")
    try:
        der = base64.b64decode(signature_text, validate=True)
        decode_dss_signature(der)
    except (binascii.Error, ValueError):
        return Checked(refusal=Refusal.CORRUPT, detail="not base64 of a DER ECDSA signature")
    signer = next((key for key in keys if _verifies(key, der, data)), None)
    if signer is None:
        return Checked(
            refusal=Refusal.UNTRUSTED_KEY,
            detail=f"verified by none of {len(keys)} trusted key(s)",
        )
    try:
        digest = signed_digest(data)
    except ValueError as exc:
        return Checked(refusal=Refusal.UNREADABLE_PAYLOAD, detail=f"{exc} (key {signer.key_id})")
    if digest != artifact_digest:
        return Checked(
            refusal=Refusal.OTHER_ARTIFACT,
            detail=f"key {signer.key_id} signed {digest}",
        )
    return Checked(key_id=signer.key_id)


def _verifies(key: PublicKey, der: bytes, data: bytes) -> bool:
    try:
        key.key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
