"""Blob data plane: Range reads over urllib3 (httpx costs 4-5x the CPU per byte; limits.md §2).

One BlobReader per layer blob; FUSE calls it from many threads. Each read is one Range GET,
sent under transport.TransportPolicy (redirects, auth challenges, retries: the same policy as the
control plane's). A registry that ignores Range (200 + whole body) is detected once: the whole
blob is then verified against its digest, kept in an unnamed temp file and served locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import urllib3

from snapshotter.remote.auth import repository_scope
from snapshotter.remote.client import RegistryClient, RepoLike, as_repository
from snapshotter.remote.errors import (
    BlobFetchError,
    RegistryUnavailable,
    UnexpectedResponse,
)
from snapshotter.remote.hosts import RegistryHost
from snapshotter.remote.reference import validate_digest
from snapshotter.remote.transport import RETRY_STATUSES, UNAUTHORIZED, ConnectionFailed, Hop

log = logging.getLogger(__name__)

DEFAULT_CONNECTIONS = 4
_STREAM_PIECE = 256 << 10  # what stream() hands its sink at a time, at most
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _HostFailed(Exception):
    """This host cannot serve the blob now (connection, 5xx after retries, 404 on a mirror)."""


class _DataPlane:
    """urllib3 pools of one RegistryClient, one PoolManager per TLS configuration."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._pools: dict[tuple[bool, tuple[str, ...]], urllib3.PoolManager] = {}
        self._lock = threading.Lock()

    def pool(self, client: RegistryClient, host: RegistryHost) -> urllib3.PoolManager:
        key = host.tls_key()
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                options: dict[str, object] = {"num_pools": 16, "maxsize": self._max_connections}
                context = client.ssl_context(host)
                if context is False:
                    options.update(cert_reqs="CERT_NONE", assert_hostname=False)
                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                elif context is not True:
                    options["ssl_context"] = context
                pool = urllib3.PoolManager(**options)  # type: ignore[arg-type]
                self._pools[key] = pool
            return pool


_planes: weakref.WeakKeyDictionary[RegistryClient, _DataPlane] = weakref.WeakKeyDictionary()
_planes_lock = threading.Lock()


def _plane_for(client: RegistryClient, max_connections: int) -> _DataPlane:
    with _planes_lock:
        plane = _planes.get(client)
        if plane is None:
            plane = _DataPlane(max_connections)
            _planes[client] = plane
        return plane


class BlobReader:
    """Random access to one blob of known size. Thread-safe."""

    def __init__(
        self,
        client: RegistryClient,
        repo: RepoLike,
        digest: str,
        size: int,
        *,
        max_connections: int = DEFAULT_CONNECTIONS,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> None:
        self.client = client
        self.repository = as_repository(repo)
        self.digest = validate_digest(digest)
        if size < 0:
            raise ValueError(f"blob {self.repository}@{digest}: negative size {size}")
        self.size = size
        self._policy = dataclasses.replace(
            client.policy,
            timeout=client.policy.timeout if timeout is None else timeout,
            retries=client.policy.retries if retries is None else retries,
        )
        self._timeout = urllib3.Timeout(
            connect=self._policy.connect_timeout, read=self._policy.timeout
        )
        self._plane = _plane_for(client, max_connections)
        self._hosts = client.hosts.hosts_for(self.repository.registry, "pull")
        self._host_index = 0
        self._scopes = [repository_scope(self.repository.name, ("pull",))]
        self._lock = threading.Lock()
        self._spool: BinaryIO | None = None  # whole verified blob, once Range was ignored
        self._spool_lock = threading.Lock()
        self.requests = 0  # Range GETs sent (for tests and metrics)

    @property
    def ranges_ignored(self) -> bool:
        """True once the registry answered a Range request with the whole blob."""
        return self._spool is not None

    def close(self) -> None:
        with self._spool_lock:
            if self._spool is not None:
                self._spool.close()
                self._spool = None

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, start: int, end: int, cause: str) -> BlobFetchError:
        return BlobFetchError(
            self.repository.registry, self.repository.name, self.digest, f"{start}-{end - 1}", cause
        )

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._error(
                offset, offset + max(length, 0), f"outside the blob (size {self.size})"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the blob: one Range GET."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        return self._fetch(offset, offset + length)

    def stream(self, offset: int, length: int, sink: Callable[[bytes], None]) -> None:
        """Bytes [offset, offset+length) handed to sink piece by piece as they arrive: one
        Range GET, not retried once a byte reached sink (a body that breaks off raises
        BlobFetchError); what sink raises ends the request and goes to the caller."""
        self._check_range(offset, length)
        if length:
            self._fetch(offset, offset + length, sink)

    def _fetch(self, start: int, end: int, sink: Callable[[bytes], None] | None = None) -> bytes:
        """Bytes [start, end) from the first host that can serve them (sticky on success);
        with sink, they go there instead (b"" is returned)."""
        if self._spool is not None:
            return self._serve_spooled(start, end, sink)
        with self._lock:
            first = self._host_index
        causes: list[str] = []
        for step in range(len(self._hosts)):
            index = (first + step) % len(self._hosts)
            host = self._hosts[index]
            try:
                is_last = step == len(self._hosts) - 1
                data = self._fetch_from(host, start, end, is_last=is_last, sink=sink)
            except _HostFailed as exc:
                causes.append(f"{host.url}: {exc}")
                continue
            if index != first:
                with self._lock:
                    self._host_index = index
            return data
        raise self._error(start, end, "; ".join(causes))

    def _fetch_from(
        self,
        host: RegistryHost,
        start: int,
        end: int,
        *,
        is_last: bool,
        sink: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Bytes [start, end) from host; a body that breaks off is asked for again, up to the
        policy's retries (not when a sink had some of it already)."""
        attempt = 0
        while True:
            try:
                return self._fetch_once(host, start, end, is_last=is_last, sink=sink)
            except _ShortBody as exc:
                if attempt >= self._policy.retries or sink is not None:
                    raise self._error(start, end, str(exc)) from None
                attempt += 1

    def _fetch_once(
        self,
        host: RegistryHost,
        start: int,
        end: int,
        *,
        is_last: bool,
        sink: Callable[[bytes], None] | None = None,
    ) -> bytes:
        pool = self._plane.pool(self.client, host)

        def send(hop: Hop) -> _Urllib3Answer:
            try:
                self.requests += 1
                return _Urllib3Answer(
                    pool.request(
                        hop.method,
                        hop.url,
                        headers=dict(hop.headers),
                        preload_content=False,
                        redirect=False,
                        retries=False,
                        timeout=self._timeout,
                    )
                )
            except urllib3.exceptions.HTTPError as exc:
                raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from None

        try:
            answer = self._policy.exchange(
                send,
                authenticator=self.client.authenticator,
                host=host,
                scopes=self._scopes,
                method="GET",
                url=host.api_url(f"/{self.repository.name}/blobs/{self.digest}"),
                headers={"Range": f"bytes={start}-{end - 1}"},
            )
        except RegistryUnavailable as exc:
            raise _HostFailed(str(exc)) from None
        except UnexpectedResponse as exc:  # too many redirects
            raise self._error(start, end, str(exc)) from None
        response, status = answer.response, answer.status
        consumed = False
        try:
            if status == 206:
                data = self._partial_body(response, start, end, sink)
                consumed = True
                return data
            if status == 200:
                log.warning(
                    "registry %s ignored Range for %s@%s: fetching the whole blob once",
                    host.url,
                    self.repository,
                    self.digest,
                )
                self._spool_whole(response, start, end)
                consumed = True
                return self._serve_spooled(start, end, sink)
            if status == UNAUTHORIZED:
                raise self._error(start, end, f"HTTP 401 from {host.url}: access refused")
            if status == 416:
                # Never read this body: distribution sends a Content-Length it does not honour.
                said = response.headers.get("content-range", "?")
                raise self._error(
                    start,
                    end,
                    f"HTTP 416 range not satisfiable (Content-Range: {said}; "
                    f"expected size {self.size})",
                )
            if status == 404:
                if not is_last:
                    raise _HostFailed("HTTP 404")
                raise self._error(start, end, f"HTTP 404 blob not found on {host.url}")
            if status in RETRY_STATUSES:  # the policy's retries are spent
                raise _HostFailed(f"HTTP {status} after {self._policy.retries + 1} attempts")
            raise self._error(start, end, f"unexpected HTTP {status} from {host.url}")
        finally:
            # A body we did not read to its end (error statuses, a 416 with a Content-Length
            # it does not honour) is dropped with its connection rather than drained.
            if not consumed:
                response.close()
            response.release_conn()

    def _partial_body(
        self,
        response: urllib3.BaseHTTPResponse,
        start: int,
        end: int,
        sink: Callable[[bytes], None] | None = None,
    ) -> bytes:
        content_range = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            response.close()
            raise self._error(start, end, f"206 without a valid Content-Range ({content_range!r})")
        got_start, got_end, total = int(match[1]), int(match[2]), match[3]
        if got_start != start or got_end != end - 1:
            response.close()
            raise self._error(
                start, end, f"206 with Content-Range {content_range!r} for another range"
            )
        if total != "*" and int(total) != self.size:
            response.close()
            raise self._error(
                start, end, f"blob size is {total} on the registry, expected {self.size}"
            )
        if sink is not None:
            received = 0
            try:
                for piece in response.stream(_STREAM_PIECE):
                    received += len(piece)
                    if received > end - start:
                        raise _ShortBody(f"body longer than the {end - start} bytes asked for")
                    sink(piece)
            except urllib3.exceptions.HTTPError as exc:
                raise _ShortBody(f"body broke off after {received} bytes: {exc}") from None
            if received != end - start:
                raise _ShortBody(f"short body: {received} of {end - start} bytes")
            return b""
        try:
            data = response.read()
        except urllib3.exceptions.HTTPError as exc:
            raise _ShortBody(f"body broke off: {type(exc).__name__}: {exc}") from None
        if len(data) != end - start:
            raise _ShortBody(f"short body: {len(data)} of {end - start} bytes")
        return bytes(data)

    def _serve_spooled(self, start: int, end: int, sink: Callable[[bytes], None] | None) -> bytes:
        """Bytes [start, end) from the spooled blob; to a sink in pieces, so a whole layer
        streamed from a registry that ignores Range is never all in memory at once."""
        if sink is None:
            return self._spooled_piece(start, end)
        for offset in range(start, end, _STREAM_PIECE):
            sink(self._spooled_piece(offset, min(end, offset + _STREAM_PIECE)))
        return b""

    def _spooled_piece(self, start: int, end: int) -> bytes:
        data = self._from_spool(start, end)
        if data is None:
            raise self._error(start, end, "the blob reader was closed while reading")
        return data

    def _spool_whole(self, response: urllib3.BaseHTTPResponse, start: int, end: int) -> None:
        with self._spool_lock:
            if self._spool is None:
                spool = tempfile.TemporaryFile(prefix="lazysnap-blob-")  # noqa: SIM115
                sha = hashlib.sha256()
                received = 0
                try:
                    for chunk in response.stream(1 << 20):
                        sha.update(chunk)
                        spool.write(chunk)
                        received += len(chunk)
                except urllib3.exceptions.HTTPError as exc:
                    spool.close()
                    raise _ShortBody(
                        f"whole-blob body broke off after {received} bytes: {exc}"
                    ) from None
                actual = "sha256:" + sha.hexdigest()
                if received != self.size or actual != self.digest:
                    spool.close()
                    raise self._error(
                        start,
                        end,
                        f"registry ignored Range and sent {received} bytes hashing to {actual}, "
                        f"expected {self.size} bytes",
                    )
                spool.flush()
                self._spool = spool
            else:
                response.close()  # another thread spooled it meanwhile

    def _from_spool(self, start: int, end: int) -> bytes | None:
        spool = self._spool
        if spool is None:
            return None
        return os.pread(spool.fileno(), end - start, start)


class _ShortBody(Exception):
    pass


@dataclass(frozen=True)
class _Urllib3Answer:
    """A urllib3 response (body not yet read) as transport.Answer."""

    response: urllib3.BaseHTTPResponse

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        value = self.response.headers.get(name)
        return str(value) if value is not None else None

    def discard(self) -> None:
        self.response.close()
        self.response.release_conn()
