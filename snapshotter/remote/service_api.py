"""JSON from lazysnap's own HTTP services (the acceleration service's task API), over the one
HTTP stack the package uses: `lazysnap accel tasks --url` reads a running service with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


class ServiceCallError(Exception):
    """The service did not answer with JSON; the message names the URL and why."""


def get_json(url: str, headers: Mapping[str, str], timeout: float) -> Any:
    """The JSON document a GET of url answers (200 only). ServiceCallError otherwise."""
    try:
        response = httpx.get(url, headers=dict(headers), timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ServiceCallError(f"{url}: {exc}") from None
    if response.status_code != 200:
        answer = " ".join(response.text[:500].split())
        raise ServiceCallError(f"{url}: HTTP {response.status_code}: {answer}")
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceCallError(f"{url}: the answer is not JSON: {exc}") from None
