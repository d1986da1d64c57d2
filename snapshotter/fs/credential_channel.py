"""Handing a mount process the pull credentials of its layer's image, in memory only.

The daemon keeps the credentials a CRI PullImage carried (remote/session_credentials.py); the
mount process of one of that image's layers reads the same repository and needs them too. They
never go into its spec file, argv or environment: the manager writes them into a pipe and hands
the child the read end (an inherited fd, or SCM_RIGHTS through the zygote); argv names only the
fd number (`--credentials-fd N`). The child reads it once at start, closes it, and keeps the
credentials in this module for its blob source (fs/blob_source.py), for that host and repository
only. A mount process started again after its death gets them again from the daemon's store
(or none, after the daemon restarted: it then uses the node's docker config, like any layer).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapshotter.remote.session_credentials import PullAuth, PullAuthError, SessionCredentials

if TYPE_CHECKING:
    from snapshotter.remote.reference import Repository

log = logging.getLogger("lazysnap.fs")

ARGUMENT = "--credentials-fd"
MAX_PAYLOAD = 32 << 10  # under a pipe's buffer: the write never blocks on a child not reading


@dataclass(frozen=True)
class _Received:
    host: str
    repository: str
    auth: PullAuth


_received: _Received | None = None


def open_channel(session: SessionCredentials | None, spec_path: str) -> int | None:
    """The read end of a pipe holding the credentials of the spec's repository, or None when
    there are none (the caller closes it once the child has it)."""
    if session is None:
        return None
    repository = _blob_repository(spec_path)
    if repository is None:
        return None
    from snapshotter.remote.hosts import normalize_host

    host = normalize_host(repository.registry)
    auth = session.get(host, repository.name)
    if auth is None:
        return None
    payload = json.dumps(
        {"host": host, "repository": repository.name, "auth": json.loads(auth.to_bytes())}
    ).encode()
    if len(payload) > MAX_PAYLOAD:
        log.warning(
            "pull credentials for %s/%s are over %d bytes: its mount process reads without them",
            host,
            repository.name,
            MAX_PAYLOAD,
        )
        return None
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, payload)
    finally:
        os.close(write_end)
    return read_end


def receive(fd: int) -> None:
    """In the mount process: take the credentials from fd (closed after), for this process."""
    global _received
    chunks: list[bytes] = []
    try:
        while sum(map(len, chunks)) <= MAX_PAYLOAD and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        obj = json.loads(b"".join(chunks))
        auth = PullAuth.from_bytes(json.dumps(obj["auth"]).encode())
        host, repository = obj["host"], obj["repository"]
        if not isinstance(host, str) or not isinstance(repository, str):
            raise PullAuthError("host or repository is not a string")
    except (ValueError, KeyError, TypeError) as exc:  # PullAuthError is a ValueError
        log.error("pull credentials from the daemon unreadable (%s): reading without them", exc)
        return
    _received = _Received(host, repository, auth)


def credentials_for(repository: Repository) -> SessionCredentials | None:
    """The received credentials as a store answering for exactly their repository, or None."""
    if _received is None:
        return None
    from snapshotter.remote.hosts import normalize_host

    if (normalize_host(repository.registry), repository.name) != (
        _received.host,
        _received.repository,
    ):
        return None
    # Kept for the mount process's life: its layer is read long after the PullImage.
    store = SessionCredentials(ttl=float("inf"), max_scopes=1)
    store.put(_received.host, _received.repository, _received.auth)
    return store


def _blob_repository(spec_path: str) -> Repository | None:
    from snapshotter.remote.errors import InvalidReference
    from snapshotter.remote.reference import Repository

    try:
        with open(spec_path, encoding="utf-8") as f:
            blob = json.load(f).get("blob") or {}
        if blob.get("kind") != "registry":
            return None
        return Repository.parse(str(blob.get("location", "")))
    except (OSError, ValueError, AttributeError, InvalidReference):
        return None  # the mount process reports a bad spec itself
