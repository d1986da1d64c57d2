"""The tag list of a repository (the acceleration service's reconcile pass reads it): every
page, following the registry's next-page links, bounded so a link that never ends stops."""

from __future__ import annotations

import contextlib

from snapshotter.remote.client import RegistryClient, RepoLike, as_repository, next_link
from snapshotter.remote.errors import UnexpectedResponse, redact_url
from snapshotter.remote.hosts import RegistryHost

# A registry's next-page Link that never ends must not hang the caller.
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
