"""Index signatures without a registry: cosign's simple signing payload, ECDSA P-256 keys, and
the node's decision for each way a signature can be wrong."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from snapshotter.config import ConfigError, load_config
from snapshotter.trust import simplesign
from snapshotter.trust.keys import (
    SigningKey,
    TrustKeyError,
    generate_signing_key,
    load_public_key,
    load_public_keys,
    load_signing_key,
    public_pem,
    write_key_pair,
)
from snapshotter.trust.policy import TrustMode, TrustPolicy
from snapshotter.trust.simplesign import Refusal

ARTIFACT = "sha256:" + "a" * 64
OTHER_ARTIFACT = "sha256:" + "b" * 64


@dataclass(frozen=True)
class Found:
    where: str
    payload: bytes | None
    signature: str
    problem: str = ""


def signed(key: SigningKey, digest: str = ARTIFACT, where: str = "referrer x") -> Found:
    payload = simplesign.payload("reg.example/team/app", digest)
    return Found(where, payload, simplesign.sign(key, payload))


def policy(*keys: SigningKey) -> TrustPolicy:
    return TrustPolicy(TrustMode.SIGNED, tuple(k.public for k in keys))


def test_payload_is_cosigns_simple_signing_document() -> None:
    doc = json.loads(simplesign.payload("reg.example/team/app", ARTIFACT))
    assert doc == {
        "critical": {
            "identity": {"docker-reference": "reg.example/team/app"},
            "image": {"docker-manifest-digest": ARTIFACT},
            "type": "cosign container image signature",
        },
        "optional": None,
    }


def test_signature_is_base64_der_ecdsa_over_sha256_of_the_payload() -> None:
    """What `cosign verify --key` checks: verifiable with nothing but the public key."""
    key = generate_signing_key()
    found = signed(key)
    assert found.payload is not None
    key.public.key.verify(
        base64.b64decode(found.signature), found.payload, ec.ECDSA(hashes.SHA256())
    )


def test_a_signature_by_a_trusted_key_over_the_artifact_is_trusted() -> None:
    key, other = generate_signing_key(), generate_signing_key()
    verdict = policy(other, key).decide(ARTIFACT, [signed(key)])
    assert verdict.trusted and key.public.key_id in verdict.reason


def test_one_good_signature_among_bad_ones_is_enough() -> None:
    key, stranger = generate_signing_key(), generate_signing_key()
    verdict = policy(key).decide(
        ARTIFACT, [signed(stranger), signed(key, OTHER_ARTIFACT), signed(key)]
    )
    assert verdict.trusted


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("none", Refusal.NO_SIGNATURE),
        ("other key", Refusal.UNTRUSTED_KEY),
        ("other artifact", Refusal.OTHER_ARTIFACT),
        ("flipped bytes", Refusal.UNTRUSTED_KEY),  # a valid DER signature nobody made
        ("garbage", Refusal.CORRUPT),
        ("payload not JSON", Refusal.UNREADABLE_PAYLOAD),
        ("wrong payload type", Refusal.UNREADABLE_PAYLOAD),
        ("payload not fetched", Refusal.UNREADABLE_PAYLOAD),
    ],
)
def test_each_bad_signature_is_refused_with_its_reason(case: str, refusal: Refusal) -> None:
    key, stranger = generate_signing_key(), generate_signing_key()
    good = signed(key)
    assert good.payload is not None
    found: list[Found]
    if case == "none":
        found = []
    elif case == "other key":
        found = [signed(stranger)]
    elif case == "other artifact":
        found = [signed(key, OTHER_ARTIFACT)]
    elif case == "flipped bytes":
        der = bytearray(base64.b64decode(good.signature))
        der[-1] ^= 1
        found = [Found("x", good.payload, base64.b64encode(bytes(der)).decode())]
    elif case == "garbage":
        found = [Found("x", good.payload, "not a signature!")]
    elif case == "payload not JSON":
        found = [Found("x", b"\xff{", simplesign.sign(key, b"\xff{"))]
    elif case == "wrong payload type":
        doc = json.loads(good.payload)
        doc["critical"]["type"] = "atomic container signature"
        data = json.dumps(doc).encode()
        found = [Found("x", data, simplesign.sign(key, data))]
    else:
        found = [Found("x", None, good.signature, "payload: HTTP 404")]
    verdict = policy(key).decide(ARTIFACT, found)
    assert not verdict.trusted
    assert verdict.refusal is refusal
    assert str(refusal) in verdict.reason


def test_a_signed_payload_for_another_artifact_names_what_it_signed() -> None:
    key = generate_signing_key()
    verdict = policy(key).decide(ARTIFACT, [signed(key, OTHER_ARTIFACT)])
    assert OTHER_ARTIFACT in verdict.reason


def test_without_keys_nothing_is_trusted_and_permissive_trusts_everything() -> None:
    key = generate_signing_key()
    verdict = TrustPolicy().decide(ARTIFACT, [signed(key)])
    assert not verdict.trusted and "no public key configured" in verdict.reason
    assert not TrustPolicy().needs_signatures  # nothing to look up: no key could verify them
    assert TrustPolicy.permissive().decide(ARTIFACT, []).trusted


def test_key_pair_files_round_trip_and_the_private_key_is_owner_only(tmp_path: Path) -> None:
    private, public, key = write_key_pair(str(tmp_path / "keys"))
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert load_signing_key(private).public.key_id == key.public.key_id
    assert load_public_key(public).key_id == key.public.key_id
    with pytest.raises(TrustKeyError, match="exists"):
        write_key_pair(str(tmp_path / "keys"))
    assert [k.key_id for k in load_public_keys([str(tmp_path / "keys")])] == [key.public.key_id]


def _pem_private(key: object) -> bytes:
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "not an ECDSA P-256 key"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "not an ECDSA P-256 key"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "secp384r1, not P-256"),
    ],
)
def test_keys_other_than_p256_are_refused_naming_the_file(
    tmp_path: Path, make: object, message: str
) -> None:
    assert callable(make)
    key = make()
    private = tmp_path / "k.key"
    private.write_bytes(_pem_private(key))
    with pytest.raises(TrustKeyError, match=message) as raised:
        load_signing_key(str(private))
    assert str(private) in str(raised.value)
    public = tmp_path / "k.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(TrustKeyError, match=message):
        load_public_key(str(public))


def test_cosign_encrypted_keys_are_refused_saying_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "cosign.key"
    path.write_text(
        "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nAAAA\n"
        "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
    )
    with pytest.raises(TrustKeyError, match="cosign import-key-pair"):
        load_signing_key(str(path))


def test_config_refuses_a_missing_or_wrong_public_key_at_start(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    missing = tmp_path / "nope.pub"
    config.write_text(f'[trust]\npublic_keys = ["{missing}"]\n')
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(str(config))
    not_a_key = tmp_path / "x.pub"
    not_a_key.write_text("hello\n")
    config.write_text(f'[trust]\npublic_keys = ["{not_a_key}"]\n')
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_config(str(config))
    config.write_text('[trust]\nmode = "lenient"\n')
    with pytest.raises(ConfigError, match=r"trust\.mode must be one of signed, permissive"):
        load_config(str(config))
    good = tmp_path / "good.pub"
    good.write_bytes(public_pem(generate_signing_key().public))
    config.write_text(f'[trust]\npublic_keys = ["{good}"]\n')
    assert load_config(str(config)).trust.public_keys == (str(good),)
    assert load_config(None).trust.mode == "signed"


def test_trust_keygen_command_writes_a_pair_and_never_replaces_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from snapshotter.cli import main

    out = tmp_path / "keys"
    assert main(["trust", "keygen", "--out", str(out)]) == 0
    key = load_signing_key(str(out / "index.key"))
    assert f"key {key.public.key_id}:" in capsys.readouterr().out
    assert load_public_key(str(out / "index.pub")).key_id == key.public.key_id
    assert main(["trust", "keygen", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert load_signing_key(str(out / "index.key")).public.key_id == key.public.key_id
