"""Where cosign keeps signatures of a manifest, read and written (the registry half of
snapshotter/trust; nothing here decides whether a signature is good).

* OCI 1.1 referrers (what lazysnap pushes, and cosign's `--registry-referrers-mode oci-1-1`):
  an image manifest with artifactType COSIGN_SIGNATURE_ARTIFACT_TYPE, the empty config, one
  SIMPLESIGNING_MEDIA_TYPE layer per signature (the payload) annotated with SIGNATURE_ANNOTATION
  (base64 signature), and subject = the signed manifest. Found through find_referrers (the
  referrers API, else the `sha256-<hex>` tag schema).
* cosign's default tag mode: the same layers in the manifest tagged `sha256-<hex>.sig`.

Every fetch is bounded: at most MAX_SIGNATURE_MANIFESTS manifests (the newest listed),
MAX_SIGNATURES_PER_MANIFEST payload layers of each, MAX_PAYLOAD_SIZE bytes per payload.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from snapshotter.remote.client import RegistryClient, RepoLike, as_repository
from snapshotter.remote.errors import ManifestNotFound, RegistryError
from snapshotter.remote.manifest import EMPTY_DIGEST, EMPTY_JSON, Descriptor, Manifest
from snapshotter.remote.reference import Reference, Repository, validate_digest
from snapshotter.remote.referrers import (
    PushedReferrer,
    fallback_tag,
    find_referrers,
    push_referrer,
    referrer_manifest,
)

COSIGN_SIGNATURE_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_SIGNATURE_MANIFESTS = 8
MAX_SIGNATURES_PER_MANIFEST = 16
MAX_PAYLOAD_SIZE = 64 << 10
_WORKERS = 4


@dataclass(frozen=True)
class SignatureBlob:
    """One signature as stored: its payload (None when it could not be fetched: problem says
    why) and the base64 signature annotation."""

    where: str  # "referrer sha256:…" or "tag sha256-….sig", for messages
    payload: bytes | None
    signature: str
    problem: str = ""


def signature_tag(digest: str) -> str:
    """cosign's tag-mode location of digest's signatures: `sha256-<hex>.sig`."""
    return f"{fallback_tag(digest)}.sig"


def find_signatures(
    client: RegistryClient, repo: RepoLike, digest: str
) -> tuple[SignatureBlob, ...]:
    """The cosign signatures stored for manifest digest in repo (referrers and the .sig tag).
    RegistryError when the registry cannot be asked; a signature whose payload cannot be
    fetched is returned with payload None."""
    repository = as_repository(repo)
    validate_digest(digest, "signed digest")
    with ThreadPoolExecutor(_WORKERS, "signatures") as pool:
        tagged = pool.submit(_tagged, client, repository, digest)
        referrers = find_referrers(client, repository, digest, COSIGN_SIGNATURE_ARTIFACT_TYPE)
        newest = list(referrers.descriptors)[-MAX_SIGNATURE_MANIFESTS:]
        manifests: list[tuple[str, Future[Manifest]]] = [
            (
                f"referrer {desc.digest}",
                pool.submit(client.get_manifest, _at(repository, digest=desc.digest)),
            )
            for desc in newest
        ]
        payloads: list[tuple[str, Descriptor, Future[bytes]]] = []
        for where, pending in manifests:
            try:
                manifest = pending.result()
            except RegistryError as exc:
                payloads.append((where, _NO_LAYER, _failed(exc)))
                continue
            payloads.extend(_payloads(pool, client, repository, where, manifest))
        where = f"tag {signature_tag(digest)}"
        try:
            tag_manifest = tagged.result()
        except RegistryError as exc:
            # cosign's tag mode is a second place to look, not a requirement: a registry (or
            # mirror chain) failing it must not hide signatures found as referrers.
            payloads.append((where, _NO_LAYER, _failed(exc)))
            tag_manifest = None
        if tag_manifest is not None:
            payloads.extend(_payloads(pool, client, repository, where, tag_manifest))
        found: list[SignatureBlob] = []
        for where, layer, fetch in payloads:
            signature = layer.annotations.get(SIGNATURE_ANNOTATION, "")
            try:
                found.append(SignatureBlob(where, fetch.result(), signature))
            except RegistryError as exc:
                found.append(SignatureBlob(where, None, signature, f"payload: {exc}"))
    return tuple(found)


_NO_LAYER = Descriptor(SIMPLESIGNING_MEDIA_TYPE, EMPTY_DIGEST, 0)


def _failed(exc: RegistryError) -> Future[bytes]:
    failed: Future[bytes] = Future()
    failed.set_exception(exc)
    return failed


def _at(repository: Repository, *, digest: str | None = None, tag: str | None = None) -> Reference:
    return Reference(
        repository.registry, repository.name, tag=tag, digest=digest, tag_given=tag is not None
    )


def _tagged(client: RegistryClient, repository: Repository, digest: str) -> Manifest | None:
    try:
        manifest = client.get_manifest(_at(repository, tag=signature_tag(digest)))
    except ManifestNotFound:
        return None
    return None if manifest.is_index else manifest


def _payloads(
    pool: ThreadPoolExecutor,
    client: RegistryClient,
    repository: Repository,
    where: str,
    manifest: Manifest,
) -> list[tuple[str, Descriptor, Future[bytes]]]:
    """Start fetching the payload of each signature layer of manifest (the newest ones)."""
    try:
        layers = [
            layer
            for layer in manifest.layers
            if layer.media_type == SIMPLESIGNING_MEDIA_TYPE
            and SIGNATURE_ANNOTATION in layer.annotations
        ][-MAX_SIGNATURES_PER_MANIFEST:]
    except RegistryError as exc:  # a malformed manifest (InvalidManifest)
        return [(where, _NO_LAYER, _failed(exc))]
    started: list[tuple[str, Descriptor, Future[bytes]]] = []
    for layer in layers:
        if layer.size > MAX_PAYLOAD_SIZE:
            too_big = RegistryError(f"payload {layer.digest}: {layer.size} bytes")
            started.append((where, layer, _failed(too_big)))
            continue
        fetch = pool.submit(client.get_blob, repository, layer.digest, MAX_PAYLOAD_SIZE)
        started.append((where, layer, fetch))
    return started


def push_signature(
    client: RegistryClient, repo: RepoLike, subject: Descriptor, payload: bytes, signature: str
) -> PushedReferrer:
    """Push one signature of subject as an OCI 1.1 referrer (cosign's artifact layout)."""
    repository = as_repository(repo)
    payload_digest = client.push_blob(repository, payload)
    client.push_blob(repository, EMPTY_JSON, EMPTY_DIGEST)
    layer = Descriptor(
        SIMPLESIGNING_MEDIA_TYPE,
        payload_digest,
        len(payload),
        annotations={SIGNATURE_ANNOTATION: signature},
    )
    manifest = referrer_manifest(subject, COSIGN_SIGNATURE_ARTIFACT_TYPE, [layer])
    return push_referrer(client, repository, manifest)
