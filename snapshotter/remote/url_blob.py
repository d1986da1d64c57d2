"""Range reads of a blob at a plain HTTP(S) URL, without registry auth or mirrors.

For the mount process's "url" blob kind (a test server, or a registry's
/v2/<repo>/blobs/<digest> on a trusted network). A registry blob proper goes through
snapshotter.remote.blob.BlobReader, which this does not reuse: that reader builds the
registry's blob path and token scopes from a repository, and a bare URL has neither.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import urllib3

from snapshotter.remote.errors import BlobFetchError, redact_url

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
