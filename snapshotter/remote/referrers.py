"""Finding and pushing OCI referrers (artifacts whose `subject` is a given manifest).

Discovery order: the OCI 1.1 referrers API; on 404 (the API does not exist, e.g. distribution
2.8 answers a router-level `404 page not found`) the `sha256-<hex>` tag schema; where that has
nothing, the legacy ORAS artifacts endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from snapshotter.remote.client import RegistryClient, RepoLike, as_repository, next_link
from snapshotter.remote.errors import (
    InvalidManifest,
    ManifestNotFound,
    ReferrerPushError,
    RegistryUnavailable,
    UnexpectedResponse,
)
from snapshotter.remote.hosts import RegistryHost
from snapshotter.remote.manifest import (
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    Manifest,
    build_index,
    media_type_of,
    sha256_digest,
)
from snapshotter.remote.reference import Reference, Repository, validate_digest

log = logging.getLogger(__name__)

ReferrerSource = Literal["referrers-api", "tag-fallback", "oras"]


@dataclass(frozen=True)
class ReferrerResult:
    descriptors: tuple[Descriptor, ...]
    source: ReferrerSource


@dataclass(frozen=True)
class PushedReferrer:
    digest: str
    source: Literal["referrers-api", "tag-fallback"]  # who indexes the subject link


def fallback_tag(digest: str) -> str:
    """`sha256:abc…` -> `sha256-abc…` (distribution-spec referrers tag schema)."""
    validate_digest(digest)
    algorithm, hex_part = digest.split(":", 1)
    tag = f"{algorithm[:32]}-{hex_part[:64]}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", tag)


def _matches(desc: Descriptor, artifact_type: str | None) -> bool:
    return artifact_type is None or desc.artifact_type == artifact_type


def _index_descriptors(body: Any, where: str, key: str = "manifests") -> list[Descriptor]:
    if not isinstance(body, dict):
        raise InvalidManifest(f"{where}: answer is not a JSON object")
    items = body.get(key) or []
    if not isinstance(items, list):
        raise InvalidManifest(f"{where}: {key!r} is not a list")
    return [Descriptor.from_json(item, f"{where} {key}[{i}]") for i, item in enumerate(items)]


def find_referrers(
    client: RegistryClient, repo: RepoLike, subject_digest: str, artifact_type: str | None = None
) -> ReferrerResult:
    """Descriptors of the manifests in repo whose subject is subject_digest, with artifactType
    artifact_type (any when None), and which mechanism answered."""
    repository = as_repository(repo)
    validate_digest(subject_digest, "subject digest")
    # The tag fallback is asked at the same time as the API: on a registry without the API
    # (docker-registry 2.8 among them) that saves the round trip the probe costs, and on one
    # with it, one small request is wasted.
    with ThreadPoolExecutor(1, "referrers-tag") as pool:
        tag_lookup = pool.submit(_tag_fallback, client, repository, subject_digest, artifact_type)
        try:
            from_api = _referrers_api(client, repository, subject_digest, artifact_type)
        except BaseException:
            _settle(tag_lookup)
            raise
        if from_api is not None:
            _settle(tag_lookup)
            return ReferrerResult(tuple(from_api), "referrers-api")
        from_tag = tag_lookup.result()
    if from_tag:
        return ReferrerResult(tuple(from_tag), "tag-fallback")
    from_oras = _oras(client, repository, subject_digest, artifact_type)
    if from_oras:
        return ReferrerResult(tuple(from_oras), "oras")
    return ReferrerResult((), "tag-fallback")


def _settle(lookup: Future[list[Descriptor]]) -> None:
    """Wait for a lookup whose answer is not needed; its failure is nobody's concern."""
    with contextlib.suppress(Exception):
        lookup.result()


def _referrers_api(
    client: RegistryClient, repository: Repository, digest: str, artifact_type: str | None
) -> list[Descriptor] | None:
    """None when the registry has no referrers API (any 404: the API must never answer 404)."""
    where = f"referrers of {repository}@{digest}"
    params = [("artifactType", artifact_type)] if artifact_type else None
    found: list[Descriptor] = []
    url: str | None = None
    first = _first_referrers_page(client, repository, digest, params, where)
    if first is None:
        return None
    response, host = first
    pages = 0
    while True:
        if pages:
            response, host = client.request(
                "GET",
                repository,
                f"/{repository.name}/referrers/{digest}",
                capability="pull",
                headers={"Accept": OCI_INDEX},
                url=url,
                host=host,
            )
        with contextlib.closing(response):
            client.check(response, where, (200,), host)
            try:
                body = response.json()
            except ValueError:
                raise InvalidManifest(
                    f"{where}: referrers API answered something that is not JSON"
                ) from None
            page = _index_descriptors(body, where)
            applied = {
                f.strip()
                for f in response.headers.get("oci-filters-applied", "").split(",")
                if f.strip()
            }
            # A registry that did not filter says so by leaving out the header: filter here.
            if "artifactType" not in applied:
                page = [d for d in page if _matches(d, artifact_type)]
            found.extend(page)
            url = next_link(response)
            pages += 1
        if url is None:
            return found
        if pages > 1000:
            raise UnexpectedResponse(f"{where}: more than 1000 pages of referrers")


def _first_referrers_page(
    client: RegistryClient,
    repository: Repository,
    digest: str,
    params: list[tuple[str, str]] | None,
    where: str,
) -> tuple[httpx.Response, RegistryHost] | None:
    """The first referrers page from the first host that has the API; None if none has it.

    Hosts are tried in order as for any request (a mirror's 404 or 5xx moves on to the next
    host). But a 404 here means "no referrers API on this host", a real answer: if every host
    after such a mirror is unreachable, that answer stands and the caller uses the tag schema
    (which the mirror may serve), instead of the lookup failing because the upstream is down."""
    hosts = client.hosts.hosts_for(repository.registry, "pull")
    without_api: list[str] = []
    for position, host in enumerate(hosts):
        is_last = position == len(hosts) - 1
        try:
            response, host = client.request(
                "GET",
                repository,
                f"/{repository.name}/referrers/{digest}",
                capability="pull",
                headers={"Accept": OCI_INDEX},
                params=params,
                host=host,
            )
        except RegistryUnavailable as exc:
            if not is_last:
                log.warning("%s: trying next host", exc)
                continue
            if without_api:
                log.warning(
                    "%s: %s; using the tag schema on %s, which has no referrers API",
                    where,
                    exc,
                    ", ".join(without_api),
                )
                return None
            raise
        if response.status_code == 404:
            response.close()
            without_api.append(host.url)
            continue
        if not is_last and response.status_code >= 500:
            log.warning(
                "mirror %s answered HTTP %d for %s: trying next host",
                host.url,
                response.status_code,
                where,
            )
            response.close()
            continue
        return response, host
    log.debug(
        "%s: no referrers API on %s (HTTP 404): using the tag schema", where, ", ".join(without_api)
    )
    return None


def _tag_fallback(
    client: RegistryClient, repository: Repository, digest: str, artifact_type: str | None
) -> list[Descriptor]:
    index = _read_fallback_index(client, repository, digest)
    if index is None:
        return []
    return [d for d in index.manifests if _matches(d, artifact_type)]


def _read_fallback_index(
    client: RegistryClient, repository: Repository, digest: str
) -> Manifest | None:
    ref = Reference(repository.registry, repository.name, tag=fallback_tag(digest), tag_given=True)
    try:
        manifest = client.get_manifest(ref)
    except ManifestNotFound:
        return None
    if not manifest.is_index:
        log.warning(
            "referrers tag %s is a %s, not an image index: ignoring it", ref, manifest.media_type
        )
        return None
    return manifest


def _oras(
    client: RegistryClient, repository: Repository, digest: str, artifact_type: str | None
) -> list[Descriptor]:
    """The archived ORAS artifacts-spec endpoint; a registry without it answers 404."""
    where = f"ORAS referrers of {repository}@{digest}"
    params = [("artifactType", artifact_type)] if artifact_type else None
    found: list[Descriptor] = []
    url: str | None = None
    host: RegistryHost | None = None
    for _page in range(1000):
        response, host = client.request(
            "GET",
            repository,
            f"/oras/artifacts/v1/{repository.name}/manifests/{digest}/referrers",
            capability="pull",
            params=params if url is None else None,
            url=url,
            host=host,
            v2=False,
        )
        with contextlib.closing(response):
            if response.status_code in (404, 405) and url is None:
                return []
            client.check(response, where, (200,), host)
            try:
                body = response.json()
            except ValueError:
                raise InvalidManifest(f"{where}: answer is not JSON") from None
            found.extend(
                d
                for d in _index_descriptors(body, where, "references")
                if _matches(d, artifact_type)
            )
            url = next_link(response)
            if url is None and isinstance(body.get("@nextLink"), str) and body["@nextLink"]:
                url = str(response.url.join(body["@nextLink"]))
        if url is None:
            break
    return found


def push_referrer(
    client: RegistryClient,
    repo: RepoLike,
    manifest_bytes: bytes,
    *,
    verify_delay: float = 0.3,
    max_attempts: int = 8,
) -> PushedReferrer:
    """PUT an artifact manifest that has a `subject`. If the registry does not answer
    OCI-Subject (it does not index subjects), add it to the subject's fallback tag index without
    dropping entries pushed concurrently by others (conditional PUT where honoured; otherwise
    re-read after a short delay and re-merge when an entry vanished)."""
    repository = as_repository(repo)
    media_type = media_type_of(manifest_bytes, f"referrer manifest for {repository}")
    digest = sha256_digest(manifest_bytes)
    manifest = Manifest(manifest_bytes, digest, media_type)
    subject = manifest.subject
    if subject is None:
        raise InvalidManifest(f"referrer manifest {digest} for {repository} has no subject")
    pushed = client.push_manifest(repository, digest, manifest_bytes, media_type)
    if pushed.oci_subject:
        if pushed.oci_subject != subject.digest:
            log.warning(
                "registry answered OCI-Subject %s for %s whose subject is %s",
                pushed.oci_subject,
                digest,
                subject.digest,
            )
        return PushedReferrer(digest, "referrers-api")
    ours = Descriptor(
        media_type,
        digest,
        len(manifest_bytes),
        annotations=manifest.annotations,
        artifact_type=manifest.artifact_type,
    )
    _merge_into_fallback_index(client, repository, subject.digest, ours, verify_delay, max_attempts)
    return PushedReferrer(digest, "tag-fallback")


def _merge_into_fallback_index(
    client: RegistryClient,
    repository: Repository,
    subject_digest: str,
    ours: Descriptor,
    verify_delay: float,
    max_attempts: int,
) -> None:
    tag = fallback_tag(subject_digest)
    where = f"referrers tag index {repository}:{tag}"
    # Every entry we ever saw must survive: one that vanishes was overwritten by a concurrent
    # pusher working from an older copy, not deleted on purpose.
    seen: dict[str, Descriptor] = {}
    for attempt in range(max_attempts):
        current = _read_fallback_index(client, repository, subject_digest)
        entries = current.manifests if current is not None else []
        for desc in entries:
            seen.setdefault(desc.digest, desc)
        seen[ours.digest] = ours
        present = {d.digest for d in entries}
        if all(d in present for d in seen):
            if attempt == 0:
                log.debug("%s already lists %s", where, ours.digest)
            return
        merged = list(entries) + [d for d in seen.values() if d.digest not in present]
        index_bytes = build_index(merged)
        try:
            client.push_manifest(
                repository, tag, index_bytes, OCI_INDEX, if_match=current.etag if current else None
            )
        except UnexpectedResponse as exc:
            if exc.status != 412:
                raise
            log.debug("%s changed under us (412): re-reading", where)
            continue
        # Let a concurrent read-modify-write that started before our PUT land, then check.
        time.sleep(verify_delay * (1 + random.random()))
        after = _read_fallback_index(client, repository, subject_digest)
        after_digests = {d.digest for d in after.manifests} if after is not None else set()
        missing = [d for d in seen if d not in after_digests]
        if not missing:
            return
        log.info("%s lost %d entries to a concurrent push: merging again", where, len(missing))
    raise ReferrerPushError(
        f"{where}: could not add {ours.digest} without losing concurrent entries after "
        f"{max_attempts} attempts"
    )


def referrer_manifest(
    subject: Descriptor,
    artifact_type: str,
    layers: list[Descriptor],
    annotations: dict[str, str] | None = None,
) -> bytes:
    """An OCI image manifest for an artifact: empty config, artifactType, subject."""
    from snapshotter.remote.manifest import EMPTY_DIGEST, OCI_EMPTY, OCI_MANIFEST

    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2},
        "layers": [d.to_json() for d in layers],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    }
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, separators=(",", ":")).encode()


__all__ = [
    "INDEX_TYPES",
    "PushedReferrer",
    "ReferrerResult",
    "fallback_tag",
    "find_referrers",
    "push_referrer",
    "referrer_manifest",
]
