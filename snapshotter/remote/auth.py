"""Registry authentication: docker config.json credentials, Basic, and the bearer token flow.

Nothing here logs a credential or a token: log lines name hosts, realms (without query) and
scopes only. Thread-safe: FUSE reads refresh tokens from many threads.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import httpx

from snapshotter.remote.credential_helper import (
    DEFAULT_HELPER_TIMEOUT,
    HELPER_PREFIX,
    HelperError,
    helper_server_url,
    run_helper,
)
from snapshotter.remote.docker_config import default_docker_config_path
from snapshotter.remote.errors import AuthenticationError, CredentialsError, redact_url
from snapshotter.remote.hosts import normalize_host
from snapshotter.remote.session_credentials import ORIGIN as SESSION_ORIGIN
from snapshotter.remote.session_credentials import PullAuth, SessionCredentials

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token service omits expires_in (token spec)
HELPER_ANSWER_TTL = 300.0  # seconds a helper's answer (credentials or "not found") is reused
HELPER_FAILURE_TTL = 30.0  # seconds before a failed helper is run again for that host


PULL = ("pull",)  # the actions of a repository scope
PUSH = ("pull", "push")


def repository_scope(name: str, actions: Sequence[str]) -> str:
    return f"repository:{name}:{','.join(actions)}"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    # Given with an image (remote/session_credentials.py): an OAuth2 refresh token for the
    # token endpoint, or a bearer token sent as it is; origin says where they came from.
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    origin: str = ""

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def describe(self) -> str:
        """Who they are, for messages (never a secret)."""
        what = (
            "a registry token"
            if self.registry_token
            else "an identity token"
            if self.identity_token
            else f"user {self.username!r}"
        )
        return f"{what} (from {self.origin})" if self.origin else what

    @classmethod
    def from_pull_auth(cls, auth: PullAuth, origin: str = SESSION_ORIGIN) -> Credentials:
        return cls(auth.username, auth.password, auth.identity_token, auth.registry_token, origin)


class CredentialStore:
    """Credentials per registry host: from a docker config.json's `auths`, from the credential
    helpers it names (run on demand, answers cached briefly), or given directly."""

    def __init__(
        self,
        entries: Mapping[str, Credentials] | None = None,
        *,
        helper_timeout: float = DEFAULT_HELPER_TIMEOUT,
        answer_ttl: float = HELPER_ANSWER_TTL,
        failure_ttl: float = HELPER_FAILURE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries = {normalize_host(h): c for h, c in (entries or {}).items()}
        self._helpers: dict[str, str] = {}
        self._default_helper: str | None = None
        self._helper_timeout = helper_timeout
        self._answer_ttl = answer_ttl
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._answers: dict[str, _HelperResult] = {}
        self._host_locks: dict[str, threading.Lock] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._session: SessionCredentials | None = None

    def consult_first(self, session: SessionCredentials) -> None:
        """Credentials given with an image (per host AND repository) win over every other
        source for that repository only; a request naming no repository never gets them."""
        self._session = session

    def _from_session(self, host: str, repository: str) -> Credentials | None:
        if self._session is None or not repository:
            return None
        auth = self._session.get(normalize_host(host), repository)
        return Credentials.from_pull_auth(auth) if auth is not None else None

    def registry_token(self, host: str, repository: str) -> str | None:
        """A bearer token given for this repository, to send as it is (no token service)."""
        creds = self._from_session(host, repository)
        return creds.registry_token if creds is not None and creds.registry_token else None

    @classmethod
    def anonymous(cls) -> CredentialStore:
        return cls()

    @classmethod
    def default_config_path(cls) -> str:
        return default_docker_config_path()

    @classmethod
    def from_docker_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        helper_timeout: float = DEFAULT_HELPER_TIMEOUT,
        answer_ttl: float = HELPER_ANSWER_TTL,
        failure_ttl: float = HELPER_FAILURE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> CredentialStore:
        """Read `auths`, `credHelpers` and `credsStore` from a docker config.json (helpers run
        later, per host, in get). A missing file (at the default path or the given one) means
        anonymous access; an unreadable or malformed one is an error."""
        config_path = os.fspath(path) if path is not None else cls.default_config_path()
        try:
            with open(config_path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            log.debug("no docker config at %s: anonymous registry access", config_path)
            return cls()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CredentialsError(f"cannot read docker config {config_path}: {exc}") from None
        if not isinstance(doc, dict):
            raise CredentialsError(f"docker config {config_path} is not a JSON object")
        store = cls(
            helper_timeout=helper_timeout,
            answer_ttl=answer_ttl,
            failure_ttl=failure_ttl,
            clock=clock,
        )
        auths = doc.get("auths") or {}
        if not isinstance(auths, dict):
            raise CredentialsError(f"docker config {config_path}: 'auths' is not an object")
        for host, entry in auths.items():
            creds = _parse_auth_entry(config_path, host, entry)
            if creds is not None:
                store._entries[normalize_host(host)] = creds
        helpers = doc.get("credHelpers") or {}
        if not isinstance(helpers, dict):
            raise CredentialsError(f"docker config {config_path}: 'credHelpers' is not an object")
        for host, name in helpers.items():
            if _helper_name(config_path, f"credHelpers[{host!r}]", name):
                store._helpers[normalize_host(host)] = name
        default = doc.get("credsStore")
        if _helper_name(config_path, "credsStore", default):
            store._default_helper = default
        return store

    def get(self, host: str, repository: str = "") -> Credentials | None:
        """Credentials given with an image of this repository (consult_first) come first.
        Then docker's rule (cli/config/configfile: getConfiguredCredentialStore and the native
        store): the host's `credHelpers` entry, else `credsStore`, is asked first, and what it
        answers wins over `auths`. Docker stops there; we fall back to the host's `auths` entry
        (else anonymous) when the helper has nothing ("not found") or fails (after one WARNING),
        where docker would go anonymous or fail the pull. So lazysnap authenticates wherever
        docker would, with the same credentials, and a config with both (an `auths` entry
        written by hand beside a desktop `credsStore`) keeps working."""
        given = self._from_session(host, repository)
        if given is not None:
            return given
        key = normalize_host(host)
        helper = self._helpers.get(key, self._default_helper)
        if helper is None:
            return self._entries.get(key)
        from_helper = self._helper_result(helper, key).credentials
        return from_helper if from_helper is not None else self._entries.get(key)

    def _helper_result(self, helper: str, key: str) -> _HelperResult:
        with self._lock:
            host_lock = self._host_locks.setdefault(key, threading.Lock())
        with host_lock:  # one helper run per host at a time; concurrent readers share it
            with self._lock:
                cached = self._answers.get(key)
            if cached is not None and self._clock() < cached.expires_at:
                return cached
            result = self._run_helper(helper, key)
            with self._lock:
                self._answers[key] = result
            return result

    def _run_helper(self, helper: str, key: str) -> _HelperResult:
        program = HELPER_PREFIX + helper
        try:
            answer = run_helper(helper, helper_server_url(key), timeout=self._helper_timeout)
        except HelperError as exc:
            fallback = "its 'auths' entry" if key in self._entries else "anonymous access"
            log.warning(
                "credential helper %s for %s failed: %s; using %s for %s (retried after %g s)",
                program,
                key,
                exc,
                fallback,
                key,
                self._failure_ttl,
            )
            return _HelperResult(None, True, self._clock() + self._failure_ttl)
        expires_at = self._clock() + self._answer_ttl
        if answer is None:
            log.debug("credential helper %s has no credentials for %s", program, key)
            return _HelperResult(None, False, expires_at)
        if answer.is_identity_token:
            with self._lock:
                first = key not in self._warned
                self._warned.add(key)
            if first:  # same treatment as an identitytoken in config.json auths
                log.warning(
                    "credential helper %s gave an identity token (OAuth2 refresh token) for %s, "
                    "which is not supported; %s is accessed anonymously",
                    program,
                    key,
                    key,
                )
            return _HelperResult(None, False, expires_at)
        log.debug("credentials for %s from %s (user %r)", key, program, answer.username)
        return _HelperResult(Credentials(answer.username, answer.secret), False, expires_at)


@dataclass(frozen=True)
class _HelperResult:
    credentials: Credentials | None
    failed: bool  # the helper could not answer (as opposed to answering "not found")
    expires_at: float


_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _helper_name(path: str, where: str, name: object) -> TypeGuard[str]:
    """True for a usable helper name; empty or absent means none (as in docker). A name that
    is not a plain word would run some other program (`docker-credential-../x`): refused."""
    if name is None or name == "":
        return False
    if not isinstance(name, str) or not _HELPER_NAME.fullmatch(name):
        raise CredentialsError(
            f"docker config {path}: {where} is not a credential helper name: {name!r}"
        )
    return True


def _parse_auth_entry(path: str, host: str, entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsError(f"docker config {path}: auths[{host!r}] is not an object")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(
                f"docker config {path}: auths[{host!r}].auth is not base64 of user:password"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(
                f"docker config {path}: auths[{host!r}].auth does not decode to user:password"
            )
        return Credentials(user, password)
    if entry.get("username") is not None and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        log.warning(
            "docker config %s: auths[%r] holds an identity token (OAuth2 refresh token), which "
            "is not supported; %s is accessed anonymously",
            path,
            host,
            host,
        )
    return None


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
