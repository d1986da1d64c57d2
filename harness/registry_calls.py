"""Registry calls only tests make (the product never deletes manifests or fetches every child
of an index; listing tags is the product's remote/tags.py, re-exported here), over the
product's RegistryClient.request: same hosts, auth and transport policy as the product's own
calls."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from snapshotter.remote.client import RegistryClient, RepoLike, as_repository
from snapshotter.remote.errors import (
    InvalidManifest,
    ManifestNotFound,
    PlatformNotFound,
)
from snapshotter.remote.manifest import Manifest, Platform
from snapshotter.remote.tags import MAX_TAG_PAGES, list_tags

__all__ = ["MAX_TAG_PAGES", "delete_manifest", "get_children", "list_tags"]

log = logging.getLogger(__name__)


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
