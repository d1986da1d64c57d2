"""Registry calls only tests make (the product never lists tags, deletes manifests or fetches
every child of an index), over the product's RegistryClient.request: same hosts, auth and
transport policy as the product's own calls."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from snapshotter.remote.client import RegistryClient, RepoLike, as_repository, next_link
from snapshotter.remote.errors import (
    InvalidManifest,
    ManifestNotFound,
    PlatformNotFound,
    UnexpectedResponse,
    redact_url,
)
from snapshotter.remote.hosts import RegistryHost
from snapshotter.remote.manifest import Manifest, Platform

log = logging.getLogger(__name__)

# A registry's next-page Link that never ends must not hang the test.
MAX_TAG_PAGES = 1000


def list_tags(client: RegistryClient, repo: RepoLike, page_size: int | None = None) -> list[str]:
    repository = as_repository(repo)
    tags: list[str] = []
    params = [("n", str(page_size))] if page_size else None
    where = f"tag list of {repository}"
    url: str | None = None
    host: RegistryHost | None = None
    read: set[str] = set()
    for _page in range(MAX_TAG_PAGES):
        response, host = client.request(
            "GET",
            repository,
            f"/{repository.name}/tags/list",
            capability="pull",
            params=params if url is None else None,
            url=url,
            host=host,
        )
        with contextlib.closing(response):
            client.check(response, where, (200,), host)
            read.add(str(response.url))
            try:
                body = response.json()
            except ValueError:
                raise UnexpectedResponse(f"{where}: answer is not JSON") from None
            listed = body.get("tags") if isinstance(body, dict) else None
            if not isinstance(listed, list | None):
                raise UnexpectedResponse(f'{where}: "tags" is not a list')
            tags.extend(str(t) for t in listed or [])
            url = next_link(response)
        if url is None:
            return tags
        if url in read:
            raise UnexpectedResponse(
                f"{where}: the registry's next-page link points back to a page already read "
                f"({redact_url(url)}), after {len(tags)} tags"
            )
    raise UnexpectedResponse(
        f"{where}: more than {MAX_TAG_PAGES} pages; the registry's next-page links never end"
    )


def delete_manifest(client: RegistryClient, repo: RepoLike, digest: str) -> None:
    repository = as_repository(repo)
    response, host = client.request(
        "DELETE",
        repository,
        f"/{repository.name}/manifests/{digest}",
        capability="push",
        actions=("delete",),
    )
    with contextlib.closing(response):
        client.check(
            response,
            f"delete of manifest {repository}@{digest}",
            (200, 202),
            host,
            ManifestNotFound,
        )


def get_children(
    client: RegistryClient, index: Manifest, platforms: Sequence[Platform] | None = None
) -> list[Manifest]:
    """Fetch the children of an index. Absent children of platforms not asked for are skipped
    with a warning (sparse index); an absent asked-for platform is PlatformNotFound."""
    if index.reference is None:
        raise InvalidManifest(f"index {index.digest} has no repository to fetch children from")
    wanted = [p.normalized() for p in platforms] if platforms else None
    children: list[Manifest] = []
    for desc in index.manifests:
        asked = wanted is None or (
            desc.platform is not None
            and any(w.match_rank(desc.platform) is not None for w in wanted)
        )
        if wanted is not None and not asked:
            continue
        try:
            children.append(client.get_manifest(index.reference.with_digest(desc.digest)))
        except ManifestNotFound:
            if wanted is not None:
                raise PlatformNotFound(
                    f"index {index.where}: manifest {desc.digest} for asked-for platform "
                    f"{desc.platform} is absent (sparse index)"
                ) from None
            log.warning(
                "index %s: skipping absent child %s (platform %s; sparse index)",
                index.where,
                desc.digest,
                desc.platform,
            )
    return children
