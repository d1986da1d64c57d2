"""How every registry request is sent, written once for both HTTP libraries.

The control plane (client.py, httpx) and the Range reader (blob.py, urllib3: it costs a quarter
of httpx's CPU per byte, limits.md §2) each implement one hop, `send(Hop) -> Answer`; the policy
here drives the hops of one request:

- redirects followed by hand, at most MAX_REDIRECTS; Authorization and the host's hosts.toml
  headers are sent only while the URL is on the registry host (the distribution spec: a
  redirect to storage MUST NOT carry the registry's credentials);
- a 401 from the registry host answered through auth.Authenticator (challenge -> token ->
  retry), at most MAX_AUTH_ROUNDS times;
- connection errors, 429 and 5xx retried with exponential backoff (Retry-After honoured up to
  MAX_RETRY_AFTER), never other 4xx.

What the caller does with the final answer (status checks, bodies) stays with the caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import urljoin, urlsplit

from snapshotter.remote.errors import RegistryUnavailable, UnexpectedResponse, redact_url
from snapshotter.remote.hosts import RegistryHost, normalize_host

if TYPE_CHECKING:  # auth loads httpx; access.py reads the defaults here without it
    from snapshotter.remote.auth import Authenticator

log = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SEE_OTHER = 303  # the redirected request becomes a GET without a body
UNAUTHORIZED = 401
MAX_REDIRECTS = 5
# A challenge answered once, and once more when the registry refuses a cached token as stale.
MAX_AUTH_ROUNDS = 2
DEFAULT_TIMEOUT = 30.0  # seconds a registry may take to answer (each read of a body too)
MAX_CONNECT_TIMEOUT = 10.0  # a host that does not accept a connection by then is down
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubled for each further one
MAX_BACKOFF = 5.0
MAX_RETRY_AFTER = 10.0  # a registry's Retry-After is honoured up to this many seconds


class ConnectionFailed(Exception):
    """Raised by a hop that got no answer (connect, TLS, read); the message names the library's
    error. Retried under the policy, then reported as RegistryUnavailable."""


class Answer(Protocol):
    """A response as the policy sees it, whatever library produced it."""

    @property
    def status(self) -> int: ...

    def header(self, name: str) -> str | None: ...

    def discard(self) -> None:
        """Drop the response unread (and its connection, if a body is pending)."""


AnswerT = TypeVar("AnswerT", bound=Answer)


@dataclass(frozen=True)
class Hop:
    """One HTTP request of an exchange."""

    method: str
    url: str
    headers: Mapping[str, str]
    redirected: bool  # url came from a Location header: it carries its own query
    with_body: bool  # False once a 303 turned the request into a GET


@dataclass(frozen=True)
class TransportPolicy:
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    @property
    def connect_timeout(self) -> float:
        return min(self.timeout, MAX_CONNECT_TIMEOUT)

    def backoff_delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER)
        return float(min(self.backoff * (2**attempt), MAX_BACKOFF))

    def exchange(
        self,
        send: Callable[[Hop], AnswerT],
        *,
        authenticator: Authenticator,
        host: RegistryHost,
        scopes: Sequence[str],
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
    ) -> AnswerT:
        """Send method url to host through its redirects, auth challenges and retries; return
        the final answer (a 401 the credentials cannot answer, or a retryable status after the
        last retry, included: the caller reports it). Raises RegistryUnavailable when no answer
        came after the retries, UnexpectedResponse after too many redirects."""
        auth = authenticator.authorization(host.host, scopes)
        registry_host = normalize_host(host.host)
        attempt = auth_rounds = redirects = 0
        current = Hop(method, url, {}, redirected=False, with_body=True)
        on_registry_host = True
        while True:
            hop_headers: dict[str, str] = {}
            if on_registry_host:
                hop_headers.update(host.headers)
            hop_headers.update(headers or {})
            if auth and on_registry_host:
                hop_headers["Authorization"] = auth
            current = Hop(
                current.method, current.url, hop_headers, current.redirected, current.with_body
            )
            try:
                answer = send(current)
            except ConnectionFailed as exc:
                if attempt < self.retries:
                    self.sleep(self.backoff_delay(attempt))
                    attempt += 1
                    continue
                raise RegistryUnavailable(
                    f"{current.method} {redact_url(current.url)} failed after {attempt + 1} "
                    f"attempts: {exc}"
                ) from None
            status = answer.status
            location = answer.header("location")
            if status in REDIRECT_STATUSES and location:
                answer.discard()
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise UnexpectedResponse(
                        f"{method} {redact_url(url)}: more than {MAX_REDIRECTS} redirects", status
                    )
                to_get = status == SEE_OTHER
                current = Hop(
                    "GET" if to_get else current.method,
                    urljoin(current.url, location),
                    {},
                    redirected=True,
                    with_body=current.with_body and not to_get,
                )
                on_registry_host = normalize_host(urlsplit(current.url).netloc) == registry_host
                log.debug("%s redirected to %s", redact_url(url), redact_url(current.url))
                continue
            if status == UNAUTHORIZED and on_registry_host and auth_rounds < MAX_AUTH_ROUNDS:
                challenge = answer.header("www-authenticate")
                new_auth = authenticator.challenge(host.host, scopes, challenge, auth)
                if new_auth is not None and new_auth != auth:
                    answer.discard()
                    auth, auth_rounds = new_auth, auth_rounds + 1
                    continue
                return answer  # nothing better to offer: the caller reports the 401
            if status in RETRY_STATUSES and attempt < self.retries:
                delay = self.backoff_delay(attempt, answer.header("retry-after"))
                answer.discard()
                log.debug(
                    "%s %s: HTTP %d, retry in %.2fs",
                    current.method,
                    redact_url(current.url),
                    status,
                    delay,
                )
                self.sleep(delay)
                attempt += 1
                continue
            return answer
