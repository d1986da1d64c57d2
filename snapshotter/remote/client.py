"""Registry control plane over httpx: manifests, blobs (whole: blob_stream.py), uploads
(upload.py).

Every request goes through `request()`: hosts from hosts.toml in order (mirrors, then the
server); each is sent under transport.TransportPolicy (redirects, auth challenges, retries),
the same policy the Range reader (blob.py) uses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from snapshotter.remote import upload
from snapshotter.remote.auth import PULL, PUSH, Authenticator, repository_scope
from snapshotter.remote.blob_stream import BlobStream
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.errors import (
    AuthenticationError,
    BlobNotFound,
    DigestMismatch,
    InvalidManifest,
    ManifestNotFound,
    NotFoundError,
    PlatformNotFound,
    RegistryError,
    RegistryUnavailable,
    UnexpectedResponse,
    single_platform_mismatch,
)
from snapshotter.remote.hosts import HostsConfig, RegistryHost
from snapshotter.remote.manifest import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    Manifest,
    Platform,
    media_type_of,
    sha256_digest,
)
from snapshotter.remote.reference import Reference, Repository, validate_digest
from snapshotter.remote.transport import (
    DEFAULT_BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    RETRY_STATUSES,
    ConnectionFailed,
    Hop,
    TransportPolicy,
)

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20  # distribution's own limit for manifests

RepoLike = Repository | Reference


def as_repository(repo: RepoLike) -> Repository:
    return repo.repository if isinstance(repo, Reference) else repo


def next_link(response: httpx.Response) -> str | None:
    """Absolute URL of the `Link: <…>; rel="next"` page, if any."""
    for part in response.headers.get_list("link", split_commas=True):
        match = re.match(r"\s*<([^>]*)>\s*;(.*)", part)
        if match and re.search(r'rel\s*=\s*"?next"?', match.group(2)):
            return str(urljoin(str(response.url), match.group(1)))
    return None


def error_detail(response: httpx.Response) -> str:
    """The registry's own error code/message (distribution JSON errors), short."""
    try:
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors:
            first = errors[0]
            return str(f"{first.get('code', '')}: {first.get('message', '')}").strip(": ")
    except (ValueError, UnicodeDecodeError, httpx.ResponseNotRead):
        pass
    return ""


@dataclass(frozen=True)
class PushedManifest:
    digest: str
    oci_subject: str | None  # the OCI-Subject header: the registry indexed the subject itself


@functools.cache
def _system_trust() -> ssl.SSLContext:
    """One verifying context per process for every host without its own `ca`; contexts are
    safe to share between threads and connections."""
    return ssl.create_default_context()


class RegistryClient:
    def __init__(
        self,
        hosts: HostsConfig | None = None,
        credentials: CredentialStore | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.hosts = hosts or HostsConfig()
        self.credentials = credentials or CredentialStore.anonymous()
        self.authenticator = Authenticator(self.credentials, timeout=timeout)
        self.policy = TransportPolicy(timeout=timeout, retries=retries, backoff=backoff)
        self._clients: dict[tuple[bool, tuple[str, ...]], httpx.Client] = {}
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ssl_context(self, host: RegistryHost) -> ssl.SSLContext | bool:
        """False to skip verification; otherwise a context trusting the system's CA store
        (what containerd trusts: a CA added with update-ca-certificates or SSL_CERT_FILE
        counts) plus the host's `ca` files. Not httpx's default, certifi's bundle: it
        ignores both, and loading it costs ~80 ms per process against ~18 ms."""
        if host.skip_verify:
            return False
        if not host.ca:
            return _system_trust()
        context = ssl.create_default_context()
        for ca in host.ca:
            context.load_verify_locations(cafile=ca)
        return context

    def warm_up(self, host: RegistryHost) -> None:
        """Build the connection pool (and its TLS context) for hosts like `host` now, off the
        path of the first request."""
        self._http(host)

    def _http(self, host: RegistryHost) -> httpx.Client:
        key = host.tls_key()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = httpx.Client(
                    verify=self.ssl_context(host),
                    timeout=httpx.Timeout(self.policy.timeout, connect=self.policy.connect_timeout),
                    follow_redirects=False,
                )
                self._clients[key] = client
            return client

    def request(
        self,
        method: str,
        repo: RepoLike,
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
    ) -> tuple[httpx.Response, RegistryHost]:
        """Send one API request for repo. path is relative to /v2 (unless v2=False). Mirrors
        that fail (connection, 5xx, 404) are skipped; the last host's answer is returned as is.
        The caller closes streamed responses."""
        repository = as_repository(repo)
        scopes = [repository_scope(repository.name, actions), *extra_scopes]
        candidates = (
            [host] if host is not None else self.hosts.hosts_for(repository.registry, capability)
        )
        last_error: RegistryError | None = None
        for i, candidate in enumerate(candidates):
            is_last = i == len(candidates) - 1
            target = url or (candidate.api_url(path) if v2 else candidate.url.rstrip("/") + path)
            try:
                response = self._send(
                    candidate, method, target, scopes, headers, params, content, stream
                )
            except RegistryUnavailable as exc:
                if is_last:
                    raise
                log.warning("%s: trying next host", exc)
                last_error = exc
                continue
            if not is_last and (response.status_code == 404 or response.status_code >= 500):
                log.warning(
                    "mirror %s answered HTTP %d for %s %s: trying next host",
                    candidate.url,
                    response.status_code,
                    method,
                    path,
                )
                response.close()
                continue
            return response, candidate
        raise last_error or RegistryUnavailable(f"no host answered for {repository}")

    def _send(
        self,
        host: RegistryHost,
        method: str,
        url: str,
        scopes: list[str],
        headers: Mapping[str, str] | None,
        params: Sequence[tuple[str, str]] | None,
        content: bytes | None,
        stream: bool,
    ) -> httpx.Response:
        client = self._http(host)
        query = httpx.QueryParams(list(params)) if params else None

        def send(hop: Hop) -> _HttpxAnswer:
            try:
                request = client.build_request(
                    hop.method,
                    hop.url,
                    headers=dict(hop.headers),
                    params=None if hop.redirected else query,  # a Location has its own query
                    content=content if hop.with_body else None,
                )
                return _HttpxAnswer(client.send(request, stream=stream))
            except httpx.TransportError as exc:
                raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from None

        answer = self.policy.exchange(
            send,
            authenticator=self.authenticator,
            host=host,
            scopes=scopes,
            method=method,
            url=url,
            headers=headers,
        )
        return answer.response

    def check(
        self,
        response: httpx.Response,
        what: str,
        ok: Sequence[int],
        host: RegistryHost,
        not_found: type[NotFoundError] = NotFoundError,
    ) -> None:
        """Raise the error a user should see when response.status_code is not in ok."""
        status = response.status_code
        if status in ok:
            return
        if stream_unread(response):
            response.read()
        detail = error_detail(response)
        suffix = f" ({detail})" if detail else ""
        where = f"{what} on {host.url}"
        if status in (401, 403):
            creds = self.credentials.get(host.host, _repository_in(response))
            who = creds.describe() if creds else "anonymous access (no credentials found)"
            raise AuthenticationError(f"{where}: HTTP {status} for {who}{suffix}")
        if status == 404:
            raise not_found(f"{where}: not found{suffix}")
        if status in RETRY_STATUSES:
            raise RegistryUnavailable(
                f"{where}: HTTP {status} after {self.policy.retries} retries{suffix}"
            )
        raise UnexpectedResponse(f"{where}: unexpected HTTP {status}{suffix}", status)

    # -- manifests ----------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, accept: str = ACCEPT_MANIFESTS) -> Manifest:
        capability = "pull" if ref.digest else "resolve"
        response, host = self.request(
            "GET",
            ref,
            f"/{ref.name}/manifests/{ref.object}",
            capability=capability,
            headers={"Accept": accept},
        )
        with contextlib.closing(response):
            self.check(response, f"manifest {ref}", (200,), host, ManifestNotFound)
            data = response.content
            if len(data) > MAX_MANIFEST_SIZE:
                raise InvalidManifest(
                    f"manifest {ref}: {len(data)} bytes exceeds the {MAX_MANIFEST_SIZE} limit"
                )
            actual = sha256_digest(data)
            if ref.digest is not None:
                if ref.digest.startswith("sha256:") and actual != ref.digest:
                    raise DigestMismatch(f"manifest {ref}: content hashes to {actual}")
                digest = ref.digest
            else:
                said = response.headers.get("docker-content-digest")
                if said and said.startswith("sha256:") and said != actual:
                    raise DigestMismatch(
                        f"manifest {ref}: registry says {said} (Docker-Content-Digest), "
                        f"content hashes to {actual}"
                    )
                digest = actual
            content_type = response.headers.get("content-type", "").split(";")[0].strip()
            media_type = media_type_of(data, f"manifest {ref}")
            if content_type in MANIFEST_TYPES + INDEX_TYPES and '"mediaType"' not in data.decode(
                errors="replace"
            ):
                media_type = content_type
        return Manifest(
            data, digest, media_type, ref.with_digest(digest), response.headers.get("etag")
        )

    def manifest_exists(self, repo: RepoLike, digest: str) -> bool:
        repository = as_repository(repo)
        response, host = self.request(
            "HEAD",
            repository,
            f"/{repository.name}/manifests/{digest}",
            capability="pull",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        with contextlib.closing(response):
            if response.status_code == 404:
                return False
            self.check(response, f"manifest {repository}@{digest}", (200,), host, ManifestNotFound)
            return True

    def resolve_platform(
        self, index: Manifest, platform: Platform | None = None, *, check_present: bool = True
    ) -> Descriptor:
        """The best descriptor in index for platform (default: this host). A listed but absent
        child (sparse index) is a PlatformNotFound naming platform and digest."""
        want = (platform or Platform.host()).normalized()
        if not index.is_index:
            return Descriptor(index.media_type, index.digest, len(index.data), platform=want)
        ranked = []
        for position, desc in enumerate(index.manifests):
            if desc.platform is None:
                continue
            rank = want.match_rank(desc.platform)
            if rank is not None:
                ranked.append((rank, position, desc))
        if not ranked:
            available = (
                ", ".join(sorted({str(d.platform) for d in index.manifests if d.platform}))
                or "none"
            )
            raise PlatformNotFound(
                f"{index.where}: no manifest for platform {want} (the index offers: {available})"
            )
        ranked.sort(key=lambda item: (item[0], item[1]))
        chosen = ranked[0][2]
        if (
            check_present
            and index.reference is not None
            and not self.manifest_exists(index.reference, chosen.digest)
        ):
            raise PlatformNotFound(
                f"{index.where}: the index lists platform {want} as {chosen.digest}, but the "
                "registry does not have that manifest (sparse index)"
            )
        return chosen

    def check_manifest_platform(self, manifest: Manifest, platform: Platform) -> None:
        """For an image manifest (not an index), reached without choosing a platform: raise
        PlatformNotFound unless its config names a platform that runs as platform (a config
        naming none passes: nothing to check)."""
        config = manifest.config
        if manifest.is_index or config is None or manifest.reference is None:
            return
        have = Platform.of_image_config(self.get_blob(manifest.reference.repository, config.digest))
        if have is not None and platform.match_rank(have) is None:
            raise single_platform_mismatch(manifest.where, platform.normalized(), have)

    def push_manifest(
        self, repo: RepoLike, ref: str, data: bytes, media_type: str, *, if_match: str | None = None
    ) -> PushedManifest:
        """PUT a manifest under a tag or digest. Returns its digest and the OCI-Subject header.
        if_match makes the PUT conditional (412 -> UnexpectedResponse with status 412) on
        registries that honour it; others ignore it."""
        repository = as_repository(repo)
        digest = sha256_digest(data)
        headers = {"Content-Type": media_type}
        if if_match:
            headers["If-Match"] = if_match
        response, host = self.request(
            "PUT",
            repository,
            f"/{repository.name}/manifests/{ref}",
            capability="push",
            actions=PUSH,
            headers=headers,
            content=data,
        )
        with contextlib.closing(response):
            self.check(
                response, f"push of manifest {repository}:{ref} ({digest})", (200, 201), host
            )
            said = response.headers.get("docker-content-digest")
            if said and said.startswith("sha256:") and said != digest:
                raise DigestMismatch(
                    f"push of manifest {repository}:{ref}: registry stored {said}, we sent {digest}"
                )
            return PushedManifest(digest, response.headers.get("oci-subject"))

    # -- blobs ----------------------------------------------------------------------------------

    def blob_exists(self, repo: RepoLike, digest: str) -> bool:
        repository = as_repository(repo)
        validate_digest(digest)
        response, host = self.request(
            "HEAD", repository, f"/{repository.name}/blobs/{digest}", capability="pull"
        )
        with contextlib.closing(response):
            if response.status_code == 404:
                return False
            self.check(response, f"blob {repository}@{digest}", (200,), host, BlobNotFound)
            return True

    @contextlib.contextmanager
    def stream_blob(
        self, repo: RepoLike, digest: str, size: int | None = None, *, check_digest: bool = True
    ) -> Iterator[BlobStream]:
        """Stream a whole blob; the digest is verified when the stream is read to its end
        (check_digest=False: only the size; the caller hashes every byte and checks it)."""
        repository = as_repository(repo)
        validate_digest(digest)
        response, host = self.request(
            "GET", repository, f"/{repository.name}/blobs/{digest}", capability="pull", stream=True
        )
        try:
            self.check(response, f"blob {repository}@{digest}", (200,), host, BlobNotFound)
            where = f"{repository}@{digest}"
            stream = BlobStream(
                response.iter_bytes(), digest, size, where, check_digest=check_digest
            )
            yield stream
        finally:
            response.close()

    def get_blob(self, repo: RepoLike, digest: str, max_size: int = 64 << 20) -> bytes:
        """A small blob (config, index), read whole and verified."""
        with self.stream_blob(repo, digest) as stream:
            # A raw stream's read(n) returns at most one network chunk: loop to EOF (which is
            # also where the digest check runs).
            data = bytearray()
            while chunk := stream.read(1 << 20):
                data += chunk
                if len(data) > max_size:
                    raise UnexpectedResponse(
                        f"blob {as_repository(repo)}@{digest} is larger than {max_size} bytes"
                    )
            return bytes(data)

    def push_blob(
        self,
        repo: RepoLike,
        data: bytes | Path,
        digest: str | None = None,
        *,
        mount_from: RepoLike | None = None,
        chunk_size: int | None = None,
        skip_existing: bool = True,
    ) -> str:
        """Upload a blob (bytes, or a file path for big ones). Tries a cross-repo mount first when
        mount_from is given; chunk_size switches to a chunked (PATCH) upload. Returns the digest."""
        return upload.push_blob(
            self,
            as_repository(repo),
            data,
            digest,
            mount_from=None if mount_from is None else as_repository(mount_from),
            chunk_size=chunk_size,
            skip_existing=skip_existing,
        )


@dataclass(frozen=True)
class _HttpxAnswer:
    """An httpx response as transport.Answer."""

    response: httpx.Response

    @property
    def status(self) -> int:
        return self.response.status_code

    def header(self, name: str) -> str | None:
        value = self.response.headers.get(name)
        return str(value) if value is not None else None

    def discard(self) -> None:
        self.response.close()


def stream_unread(response: httpx.Response) -> bool:
    return not response.is_stream_consumed and not hasattr(response, "_content")


_API_REPOSITORY = re.compile(r"/v2/(.+?)/(?:manifests|blobs|referrers|tags)/")


def _repository_in(response: httpx.Response) -> str:
    """The repository a registry API request was about (credentials are per repository when
    given with an image), or "" when the URL does not say."""
    match = _API_REPOSITORY.search(response.request.url.path)
    return match.group(1) if match else ""
