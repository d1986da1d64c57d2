"""A layer blob served by a plain HTTP test server that answers Range requests at any path
(tests/fs/fs_helpers.BlobServer), as the fs layer reads it.

- UrlBlobSource: Range reads of the blob's URL, an fs.reader.BlobSource for tests that drive the
  reader in their own process (no registry auth, mirrors or retries).
- served_blob_spec: the mount spec's "registry" blob for such a server. The product's Range
  reader asks it for /v2/<repository>/blobs/<digest> (with the product's transport policy),
  which the server answers like any other path.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import urllib3

from snapshotter.fs.blob_source import BlobSpec
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.errors import BlobFetchError, redact_url

SERVED_REPOSITORY = "served/layer"  # any name: the server answers every path

DEFAULT_CONNECTIONS = 4
MAX_CONNECT_TIMEOUT_S = 5.0


class UrlBlobSource:
    """One Range GET per read, on a small keep-alive pool; fails (never retries for long)
    within timeout so that a dead server turns into EIO quickly. Thread-safe."""

    def __init__(
        self, url: str, *, timeout: float, digest: str = "", connections: int = DEFAULT_CONNECTIONS
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} is not an http(s) URL with a host")
        self.url = url
        self.digest = digest
        # Errors name host and path only: user:password and a query may hold secrets.
        self._host = parts.netloc.rsplit("@", 1)[-1]
        self._path = parts.path.lstrip("/")
        self._timeout = urllib3.Timeout(connect=min(timeout, MAX_CONNECT_TIMEOUT_S), read=timeout)
        self._pool = urllib3.PoolManager(maxsize=connections, block=False)

    def read(self, offset: int, length: int) -> bytes:
        byte_range = f"{offset}-{offset + length - 1}"
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
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {byte_range}/"):
            raise self._error(byte_range, f"Content-Range {content_range!r}")
        data: bytes = response.data
        if len(data) != length:
            raise self._error(byte_range, f"got {len(data)} bytes")
        return data

    def _error(self, byte_range: str, cause: str) -> BlobFetchError:
        return BlobFetchError(self._host, self._path, self.digest, byte_range, cause)

    def close(self) -> None:
        self._pool.clear()


def served_blob_spec(url: str, digest: str, size: int) -> BlobSpec:
    """The mount spec blob for a test server at url (http://host:port/...) serving a blob of
    size bytes with this digest."""
    host = urlsplit(url).netloc
    return BlobSpec(
        "registry",
        f"{host}/{SERVED_REPOSITORY}",
        digest,
        size,
        RegistryAccess(plain_http=(host,)),
    )
