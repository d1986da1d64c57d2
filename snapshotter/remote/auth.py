"""Registry authentication: Basic, and the bearer token flow (challenge -> token -> retry),
with the credentials credentials.py finds.

Nothing here logs a credential or a token: log lines name hosts, realms (without query) and
scopes only. Thread-safe: FUSE reads refresh tokens from many threads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.errors import AuthenticationError, redact_url
from snapshotter.remote.hosts import normalize_host

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token service omits expires_in (token spec)


PULL = ("pull",)  # the actions of a repository scope
PUSH = ("pull", "push")


def repository_scope(name: str, actions: Sequence[str]) -> str:
    return f"repository:{name}:{','.join(actions)}"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


_CHALLENGE_PARAM = re.compile(
    r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(,|$)'
)


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse `Bearer realm="…",service="…",scope="…"` (several challenges may follow each other)."""
    challenges: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        match = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)").match(text, pos)
        if match is None:
            break
        scheme = match.group(1).lower()
        pos = match.end()
        params: dict[str, str] = {}
        while pos < len(text):
            pm = _CHALLENGE_PARAM.match(text, pos)
            if pm is None:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        challenges.append(Challenge(scheme, params))
    return challenges


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float
    lifetime: float


@dataclass(frozen=True)
class _BearerRealm:
    realm: str
    service: str | None


TokenFetcher = Callable[[str, str | None, Sequence[str], Credentials | None], tuple[str, float]]


class Authenticator:
    """Decides the Authorization header per (host, scopes) and answers 401 challenges.

    Use: send `authorization(host, scopes)` (may be None); on a 401 call `challenge(...)` with the
    WWW-Authenticate header and what was sent; retry with what it returns, or stop on None.
    """

    def __init__(
        self,
        credentials: CredentialStore,
        *,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        fetch_token: TokenFetcher | None = None,
    ) -> None:
        self.credentials = credentials
        self._timeout = timeout
        self._clock = clock
        self._fetch = fetch_token or self._fetch_token_http
        self._lock = threading.Lock()
        self._schemes: dict[str, str] = {}  # host -> "basic" | "bearer" learned from challenges
        self._realms: dict[str, _BearerRealm] = {}
        self._tokens: dict[tuple[str, frozenset[str]], _Token] = {}
        self._fetch_locks: dict[tuple[str, frozenset[str]], threading.Lock] = {}

    def authorization(self, host: str, scopes: Sequence[str]) -> str | None:
        """Header to send before any challenge was seen for this request."""
        host = normalize_host(host)
        repository = _repository_of(scopes)
        direct = self.credentials.registry_token(host, repository)
        if direct is not None:
            return f"Bearer {direct}"
        with self._lock:
            scheme = self._schemes.get(host)
        if scheme == "basic":
            creds = self.credentials.get(host, repository)
            return creds.basic_header() if creds else None
        if scheme == "bearer":
            return self._bearer(host, scopes, stale=None)
        return None

    def challenge(
        self, host: str, scopes: Sequence[str], www_authenticate: str | None, sent: str | None
    ) -> str | None:
        """A 401 came back. Returns the header to retry with, or None when retrying is useless."""
        host = normalize_host(host)
        repository = _repository_of(scopes)
        direct = self.credentials.registry_token(host, repository)
        if direct is not None:  # sent already, or to send now; nothing else is tried
            return None if f"Bearer {direct}" == sent else f"Bearer {direct}"
        challenges = parse_www_authenticate(www_authenticate or "")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None and bearer.params.get("realm"):
            realm = _BearerRealm(bearer.params["realm"], bearer.params.get("service"))
            all_scopes = list(scopes)
            for scope in (bearer.params.get("scope") or "").split(" "):
                if scope and scope not in all_scopes:
                    all_scopes.append(scope)
            with self._lock:
                self._schemes[host] = "bearer"
                self._realms[host] = realm
            return self._bearer(host, all_scopes, stale=sent)
        if basic is not None or (not challenges and sent is None):
            creds = self.credentials.get(host, repository)
            with self._lock:
                self._schemes[host] = "basic"
            if creds is None:
                return None
            header = creds.basic_header()
            return None if header == sent else header
        return None

    def _bearer(self, host: str, scopes: Sequence[str], stale: str | None) -> str | None:
        key = (host, frozenset(scopes))
        with self._lock:
            lock = self._fetch_locks.setdefault(key, threading.Lock())
        with lock:  # one token fetch per (host, scopes) at a time; others reuse its result
            with self._lock:
                token = self._tokens.get(key)
                realm = self._realms.get(host)
            now = self._clock()
            if token is not None and f"Bearer {token.value}" != stale:
                margin = min(10.0, token.lifetime * 0.1)
                if now < token.expires_at - margin:
                    return f"Bearer {token.value}"
            if realm is None:
                return None
            log.debug(
                "requesting token for %s from %s (service=%s, scopes=%s)",
                host,
                redact_url(realm.realm),
                realm.service,
                " ".join(scopes),
            )
            value, lifetime = self._fetch(
                realm.realm,
                realm.service,
                list(scopes),
                self.credentials.get(host, _repository_of(scopes)),
            )
            with self._lock:
                self._tokens[key] = _Token(value, now + lifetime, lifetime)
            return f"Bearer {value}"

    def _fetch_token_http(
        self, realm: str, service: str | None, scopes: Sequence[str], creds: Credentials | None
    ) -> tuple[str, float]:
        params: list[tuple[str, str | int | float | bool | None]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        where = redact_url(realm)
        try:
            if creds is not None and creds.identity_token:
                response = _refresh_token_grant(
                    realm, service, scopes, creds.identity_token, self._timeout
                )
            else:
                headers = {"Authorization": creds.basic_header()} if creds else {}
                response = httpx.get(realm, params=params, headers=headers, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise AuthenticationError(
                f"token service {where} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code in (401, 403):
            who = f"credentials of {creds.describe()}" if creds else "anonymous access"
            raise AuthenticationError(
                f"token service {where} refused {who} (HTTP {response.status_code})"
            )
        if response.status_code != 200:
            raise AuthenticationError(f"token service {where} answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise AuthenticationError(
                f"token service {where} answered something that is not JSON"
            ) from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthenticationError(
                f"token service {where} answered without token or access_token"
            )
        expires_in = body.get("expires_in")
        lifetime = (
            float(expires_in)
            if isinstance(expires_in, (int, float)) and expires_in > 0
            else DEFAULT_TOKEN_LIFETIME
        )
        return value, lifetime


OAUTH_CLIENT_ID = "lazysnap"


def _refresh_token_grant(
    realm: str, service: str | None, scopes: Sequence[str], refresh_token: str, timeout: float
) -> httpx.Response:
    """An identity token is an OAuth2 refresh token: POST it to the token endpoint (the token
    spec's oauth flow) for an access token of these scopes."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": OAUTH_CLIENT_ID,
        "scope": " ".join(scopes),
    }
    if service:
        form["service"] = service
    return httpx.post(realm, data=form, timeout=timeout)


def _repository_of(scopes: Sequence[str]) -> str:
    """The repository a request is for: its first `repository:NAME:actions` scope."""
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        if kind == "repository" and ":" in rest:
            return rest.rpartition(":")[0]
    return ""
