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
    DigestMismatch raised naming the digest, so nothing unverified is taken as complete
    (check_digest=False: only the size, for a caller that checks the digest itself)."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        digest: str,
        expected_size: int | None,
        where: str,
        *,
        check_digest: bool = True,
    ) -> None:
        super().__init__()
        self._chunks = chunks
        self._digest = digest
        self._expected_size = expected_size
        self._where = where
        # None: the caller hashes every byte itself and checks the digest (the index builder).
        self._hash = hashlib.new(digest.split(":", 1)[0]) if check_digest else None
        self._chunk = b""  # the network chunk being handed out, from _offset on
        self._offset = 0
        self._received = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        """size bytes, fewer only at the end (b"" there; size < 0: all the rest), gathered from
        the network chunks: a network chunk that is exactly what is asked for is handed out
        as is, more are joined once (RawIOBase.read would copy every byte twice more)."""
        if size < 0:
            return self.readall()
        parts: list[bytes] = []
        wanted = size
        while wanted > 0 and self._fill():
            n = min(wanted, len(self._chunk) - self._offset)
            if self._offset == 0 and n == len(self._chunk):
                parts.append(self._chunk)
            else:
                parts.append(self._chunk[self._offset : self._offset + n])
            self._offset += n
            wanted -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readall(self) -> bytes:
        parts = []
        while part := self.read(1 << 20):
            parts.append(part)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._fill():
            return 0
        n = min(len(view), len(self._chunk) - self._offset)
        view[:n] = memoryview(self._chunk)[self._offset : self._offset + n]
        self._offset += n
        return n

    def _fill(self) -> bool:
        """Make sure unread bytes are at hand; False at the (verified) end of the blob."""
        while self._offset == len(self._chunk):
            if self._done:
                return False
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish()
                return False
            except httpx.HTTPError as exc:
                raise RegistryUnavailable(
                    f"blob {self._where}: body broke off after {self._received} bytes: {exc}"
                ) from None
            if self._hash is not None:
                self._hash.update(chunk)
            self._received += len(chunk)
            self._chunk, self._offset = chunk, 0
        return True

    def _finish(self) -> None:
        self._done = True
        if self._expected_size is not None and self._received != self._expected_size:
            raise DigestMismatch(
                f"blob {self._where}: got {self._received} bytes, expected {self._expected_size}"
            )
        if self._hash is None:
            return
        actual = f"{self._digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatch(f"blob {self._where}: content hashes to {actual}")
