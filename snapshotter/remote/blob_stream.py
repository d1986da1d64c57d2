"""A whole blob's body as a readable stream, checked against its digest (and size) at the end:
what RegistryClient.stream_blob and get_blob hand out."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import httpx

from snapshotter.remote.errors import DigestMismatch, RegistryUnavailable


class BlobStream(io.RawIOBase):
    """A blob body as a readable stream; at end of stream the digest (and size) is checked and
    DigestMismatch raised naming the digest, so nothing unverified is taken as complete."""

    def __init__(
        self, chunks: Iterator[bytes], digest: str, expected_size: int | None, where: str
    ) -> None:
        super().__init__()
        self._chunks = chunks
        self._digest = digest
        self._expected_size = expected_size
        self._where = where
        self._hash = hashlib.new(digest.split(":", 1)[0])
        self._buffer = b""
        self._received = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._buffer and not self._done:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish()
                break
            except httpx.HTTPError as exc:
                raise RegistryUnavailable(
                    f"blob {self._where}: body broke off after {self._received} bytes: {exc}"
                ) from None
            self._hash.update(chunk)
            self._received += len(chunk)
            self._buffer = chunk
        n = min(len(view), len(self._buffer))
        view[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def _finish(self) -> None:
        self._done = True
        if self._expected_size is not None and self._received != self._expected_size:
            raise DigestMismatch(
                f"blob {self._where}: got {self._received} bytes, expected {self._expected_size}"
            )
        actual = f"{self._digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatch(f"blob {self._where}: content hashes to {actual}")
