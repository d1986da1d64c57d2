"""Where a mount process reads the compressed layer blob from, described by a JSON-able spec.

kinds:
- "file": a local copy of the blob (pread); tests, and layers already on disk.
- "url": a plain HTTP(S) URL answering Range requests without authentication (a registry's
  /v2/<repo>/blobs/<digest> on a trusted network, or a test server).
Registry access with auth and hosts.toml belongs to snapshotter.remote; the manager's resolver
hands such a source in once it exists (see manager.LayerSpec).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from snapshotter.fs.reader import BlobSource
from snapshotter.remote.errors import BlobFetchError, redact_url

BLOB_KINDS = ("file", "url")


class BlobSpecError(ValueError):
    """A blob source description that cannot be used; the message names the key."""


@dataclass(frozen=True)
class BlobSpec:
    kind: str
    location: str  # file path or URL
    digest: str = ""  # for error messages

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location, "digest": self.digest}

    @classmethod
    def from_json(cls, obj: Any) -> BlobSpec:
        if not isinstance(obj, dict):
            raise BlobSpecError(f"blob: expected an object, got {type(obj).__name__}")
        kind = obj.get("kind")
        if kind not in BLOB_KINDS:
            raise BlobSpecError(f"blob.kind: {kind!r} is not one of {', '.join(BLOB_KINDS)}")
        location = obj.get("location")
        if not isinstance(location, str) or not location:
            raise BlobSpecError("blob.location: missing or not a string")
        digest = obj.get("digest", "")
        if not isinstance(digest, str):
            raise BlobSpecError("blob.digest: not a string")
        if kind == "url" and urlsplit(location).scheme not in ("http", "https"):
            raise BlobSpecError(f"blob.location: {redact_url(location)!r} is not an http(s) URL")
        return cls(kind=kind, location=location, digest=digest)


class FileBlobSource:
    def __init__(self, path: str, digest: str = "") -> None:
        self.path = path
        self.digest = digest
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BlobSpecError(f"blob file {path}: {exc.strerror}") from exc

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BlobFetchError(
                "file", self.path, self.digest, _range(offset, length), str(exc)
            ) from None
        if len(data) != length:
            raise BlobFetchError(
                "file", self.path, self.digest, _range(offset, length), f"short read {len(data)}"
            )
        return data

    def close(self) -> None:
        os.close(self._fd)


class UrlBlobSource:
    """One Range GET per read, on a small keep-alive pool; fails (never retries for long)
    within timeout so that a dead registry turns into EIO quickly."""

    def __init__(self, url: str, *, timeout: float, digest: str = "", connections: int = 4):
        self.url = url
        self.digest = digest
        self._host = urlsplit(url).netloc.rsplit("@", 1)[-1]
        self._path = urlsplit(url).path
        self._timeout = urllib3.Timeout(connect=min(timeout, 5.0), read=timeout)
        self._pool = urllib3.PoolManager(maxsize=connections, block=False)

    def read(self, offset: int, length: int) -> bytes:
        byte_range = _range(offset, length)
        try:
            response = self._pool.request(
                "GET",
                self.url,
                headers={"Range": f"bytes={byte_range}"},
                timeout=self._timeout,
                retries=urllib3.Retry(total=1, connect=1, read=0, redirect=5, backoff_factor=0),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(byte_range, f"{type(exc).__name__}: {exc}") from None
        if response.status != 206:
            raise self._error(byte_range, f"HTTP {response.status} (expected 206)")
        expected = f"bytes {byte_range}/"
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(expected):
            raise self._error(byte_range, f"Content-Range {content_range!r}")
        data: bytes = response.data
        if len(data) != length:
            raise self._error(byte_range, f"got {len(data)} bytes")
        return data

    def _error(self, byte_range: str, cause: str) -> BlobFetchError:
        return BlobFetchError(self._host, self._path, self.digest, byte_range, cause)

    def close(self) -> None:
        self._pool.clear()


def open_blob_source(spec: BlobSpec, *, timeout: float) -> BlobSource:
    if spec.kind == "file":
        return FileBlobSource(spec.location, spec.digest)
    return UrlBlobSource(spec.location, timeout=timeout, digest=spec.digest)


def _range(offset: int, length: int) -> str:
    return f"{offset}-{offset + length - 1}"
