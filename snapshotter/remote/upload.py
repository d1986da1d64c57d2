"""Blob upload (distribution's push API): one POST opens the upload (or mounts the blob from
another repository of the same registry when asked), then the bytes go in one PUT
(monolithic) or in PATCHes of chunk_size ending with an empty PUT (chunked).

RegistryClient.push_blob is the entry point; this module sends through the client's request()
and check() (the hosts, auth and transport policy of every other request), which it names as a
protocol so that it does not import the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urljoin

import httpx

from snapshotter.remote.auth import PULL, PUSH, repository_scope
from snapshotter.remote.errors import NotFoundError, UnexpectedResponse
from snapshotter.remote.hosts import HostsConfig, RegistryHost
from snapshotter.remote.manifest import sha256_digest
from snapshotter.remote.reference import Repository, validate_digest

log = logging.getLogger(__name__)


class UploadChannel(Protocol):
    """What an upload needs of RegistryClient."""

    hosts: HostsConfig

    def request(
        self,
        method: str,
        repo: Repository,
        path: str,
        *,
        capability: str,
        actions: Sequence[str] = PULL,
        extra_scopes: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        params: Sequence[tuple[str, str]] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        v2: bool = True,
        host: RegistryHost | None = None,
        url: str | None = None,
    ) -> tuple[httpx.Response, RegistryHost]: ...

    def check(
        self,
        response: httpx.Response,
        what: str,
        ok: Sequence[int],
        host: RegistryHost,
        not_found: type[NotFoundError] = NotFoundError,
    ) -> None: ...

    def blob_exists(self, repo: Repository, digest: str) -> bool: ...


def push_blob(
    client: UploadChannel,
    repository: Repository,
    data: bytes | Path,
    digest: str | None = None,
    *,
    mount_from: Repository | None = None,
    chunk_size: int | None = None,
    skip_existing: bool = True,
) -> str:
    """Upload a blob (bytes, or a file path for big ones). Tries a cross-repo mount first when
    mount_from is given; chunk_size switches to a chunked (PATCH) upload. Returns the digest."""
    size = len(data) if isinstance(data, bytes) else os.path.getsize(data)
    if digest is None:
        digest = sha256_digest(data) if isinstance(data, bytes) else _file_digest(data)
    validate_digest(digest)
    if skip_existing and client.blob_exists(repository, digest):
        return digest
    host = client.hosts.hosts_for(repository.registry, "push")[0]
    what = f"upload of blob {digest} to {repository}"
    params: list[tuple[str, str]] = []
    extra: list[str] = []
    if mount_from is not None:
        params = [("mount", digest), ("from", mount_from.name)]
        extra = [repository_scope(mount_from.name, PULL)]
    response, host = client.request(
        "POST",
        repository,
        f"/{repository.name}/blobs/uploads/",
        capability="push",
        actions=PUSH,
        extra_scopes=extra,
        params=params or None,
        host=host,
    )
    with contextlib.closing(response):
        if response.status_code == 201 and mount_from is not None:
            log.debug("mounted %s into %s from %s", digest, repository, mount_from)
            return digest
        client.check(response, what, (202,), host)
        location = _location(response, what)
    if chunk_size is None or size <= chunk_size:
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        _finish_upload(client, repository, host, location, digest, body, what)
        return digest
    offset = 0
    with _open_source(data) as source_file:
        while offset < size:
            chunk = source_file.read(chunk_size)
            end = offset + len(chunk) - 1
            response, _ = client.request(
                "PATCH",
                repository,
                "",
                capability="push",
                actions=PUSH,
                host=host,
                url=location,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end}",
                    "Content-Length": str(len(chunk)),
                },
                content=chunk,
            )
            with contextlib.closing(response):
                client.check(response, f"{what} (chunk at {offset})", (202,), host)
                location = _location(response, what)
            offset += len(chunk)
    _finish_upload(client, repository, host, location, digest, b"", what)
    return digest


def _location(response: httpx.Response, what: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise UnexpectedResponse(
            f"{what}: registry answered {response.status_code} without Location"
        )
    return str(urljoin(str(response.url), str(location)))


def _finish_upload(
    client: UploadChannel,
    repository: Repository,
    host: RegistryHost,
    location: str,
    digest: str,
    body: bytes,
    what: str,
) -> None:
    separator = "&" if "?" in location else "?"
    url = f"{location}{separator}digest={quote(digest)}"
    response, _ = client.request(
        "PUT",
        repository,
        "",
        capability="push",
        actions=PUSH,
        host=host,
        url=url,
        headers={"Content-Type": "application/octet-stream"},
        content=body,
    )
    with contextlib.closing(response):
        client.check(response, what, (201, 204), host)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def _open_source(data: bytes | Path) -> Iterator[io.BufferedIOBase]:
    if isinstance(data, bytes):
        yield io.BytesIO(data)
    else:
        with open(data, "rb") as f:
            yield f
