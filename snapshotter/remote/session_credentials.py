"""Pull credentials the daemon was handed with an image (a CRI PullImage's `auth`), in memory only.

kubelet sends each image's pull secret inside the PullImage request, never to the node's docker
config. The image-service proxy (service/cri_proxy.py) puts the `auth` of each PullImage here,
scoped to the registry host AND repository of that image, for a limited time; discovery and
the mount processes of that image's layers consult it before the node's docker config
(remote/auth.py CredentialStore). Nothing here is written to disk, logged or put in argv: a
restart of the daemon forgets everything (layers then fall back, or use the node's config).

Standard library only: the daemon imports it at start when the proxy is on.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_TTL_SECONDS = 3600.0
MAX_SCOPES = 4096  # images with credentials remembered at once; the oldest are forgotten first
ORIGIN = "the CRI PullImage of this image"  # where these credentials came from, for messages


class PullAuthError(ValueError):
    """A PullImage `auth` that cannot be used; the message never holds a secret."""


@dataclass(frozen=True)
class PullAuth:
    """What one PullImage carried (CRI AuthConfig, decoded): a user and password, an identity
    token (an OAuth2 refresh token for the registry's token endpoint) or a registry token (a
    bearer token sent as it is). repr shows no secret."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def from_cri(
        cls,
        *,
        username: str,
        password: str,
        auth: str,
        identity_token: str,
        registry_token: str,
    ) -> PullAuth | None:
        """The CRI AuthConfig fields as containerd reads them (`auth` is base64 of
        user:password and wins over username/password); None when it holds nothing."""
        if auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise PullAuthError("auth is not base64 of user:password") from None
            user, sep, secret = decoded.partition(":")
            if not sep:
                raise PullAuthError("auth does not decode to user:password")
            username, password = user, secret
        found = cls(username, password, identity_token, registry_token)
        return found if found.usable else None

    @property
    def usable(self) -> bool:
        return bool(self.registry_token or self.identity_token or (self.username and self.password))

    @property
    def kind(self) -> str:
        """What it is, for log lines (never the value)."""
        if self.registry_token:
            return "a registry token"
        if self.identity_token:
            return "an identity token"
        return f"user {self.username!r}"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "username": self.username,
                "password": self.password,
                "identity_token": self.identity_token,
                "registry_token": self.registry_token,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PullAuth:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PullAuthError("pull credentials: not JSON") from None
        names = ("username", "password", "identity_token", "registry_token")
        if not isinstance(obj, dict) or not all(isinstance(obj.get(n, ""), str) for n in names):
            raise PullAuthError("pull credentials: not an object of strings")
        return cls(*(str(obj.get(n, "")) for n in names))


@dataclass(frozen=True)
class _Entry:
    auth: PullAuth
    expires_at: float


class SessionCredentials:
    """PullAuth per (registry host, repository), each kept ttl seconds after its last PullImage.
    Thread-safe; bounded to max_scopes entries. Hosts are given normalized (remote.auth's
    normalize_host), repositories as in the image reference (`library/busybox`)."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL_SECONDS,
        *,
        max_scopes: int = MAX_SCOPES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_scopes <= 0:
            raise ValueError("SessionCredentials: ttl and max_scopes must be positive")
        self._ttl = ttl
        self._max = max_scopes
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, host: str, repository: str, auth: PullAuth) -> None:
        key = (host, repository)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Entry(auth, self._clock() + self._ttl)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def get(self, host: str, repository: str) -> PullAuth | None:
        """The credentials of exactly this repository on exactly this host, unless expired."""
        key = (host, repository)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._clock() >= entry.expires_at:
                del self._entries[key]
                return None
            return entry.auth

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for e in self._entries.values() if now < e.expires_at)
