"""Registry credentials and where they come from: pull credentials given with an image (the
CRI proxy's, in memory), docker's config.json `auths`, and its credential helpers
(`credsStore`/`credHelpers`, run by credential_helper.py). Nothing here logs a secret.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from snapshotter.remote.credential_helper import (
    DEFAULT_HELPER_TIMEOUT,
    HELPER_PREFIX,
    HelperError,
    helper_server_url,
    run_helper,
)
from snapshotter.remote.docker_config import default_docker_config_path
from snapshotter.remote.errors import CredentialsError
from snapshotter.remote.hosts import normalize_host
from snapshotter.remote.session_credentials import ORIGIN as SESSION_ORIGIN
from snapshotter.remote.session_credentials import PullAuth, SessionCredentials

log = logging.getLogger(__name__)

HELPER_ANSWER_TTL = 300.0  # seconds a helper's answer (credentials or "not found") is reused
HELPER_FAILURE_TTL = 30.0  # seconds before a failed helper is run again for that host


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
