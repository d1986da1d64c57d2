"""How a process reaches registries, as one frozen value: the hosts.toml tree, the registries
spoken to over plain http, the docker config.json with the credentials, timeout and retries.

It builds the control-plane client and the Range readers, and travels as JSON in a mount
process's spec, so a lazy layer is read with exactly the settings (and credentials file) that
found it. Every place that talks to a registry builds its clients from one of these.

Credentials rule, the same everywhere: a docker config not named is this process's default
($DOCKER_CONFIG/config.json, else ~/.docker/config.json), resolved to a path once, by
`RegistryAccess.create`, so that processes started later (mount processes, under another
environment) read the same file; a file that does not exist means anonymous access. An empty
docker_config in the value itself means anonymous access.

Light to import (no HTTP library): `lazysnap pull` and the mount spec parser load it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from snapshotter.remote.docker_config import default_docker_config_path
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.transport import DEFAULT_RETRIES, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from snapshotter.remote.blob import BlobReader
    from snapshotter.remote.client import RegistryClient, RepoLike
    from snapshotter.remote.credentials import CredentialStore


class AccessSpecError(ValueError):
    """A registry access description that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RegistryAccess:
    hosts_dir: str = ""  # containerd hosts.toml tree; "": each registry's default endpoint
    plain_http: tuple[str, ...] = ()  # registry hosts ("host:port") reached over http://
    docker_config: str = ""  # docker config.json with the credentials; "": anonymous
    timeout: float = DEFAULT_TIMEOUT  # seconds; see transport.TransportPolicy
    retries: int = DEFAULT_RETRIES

    @classmethod
    def create(
        cls,
        *,
        hosts_dir: str | None = None,
        plain_http: Iterable[str] = (),
        docker_config: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> RegistryAccess:
        """The access of this process: docker_config None or "" is its default path (see the
        module's credentials rule), made explicit here."""
        return cls(
            hosts_dir=hosts_dir or "",
            plain_http=tuple(plain_http),
            docker_config=docker_config or default_docker_config_path(),
            timeout=timeout,
            retries=retries,
        )

    def with_plain_http(self, *registries: str) -> RegistryAccess:
        """This access, also speaking plain http to registries (`--plain-http` for an image)."""
        added = tuple(r for r in registries if r not in self.plain_http)
        return dataclasses.replace(self, plain_http=self.plain_http + added)

    def hosts(self) -> HostsConfig:
        return HostsConfig(self.hosts_dir or None, plain_http=self.plain_http)

    def credentials(self) -> CredentialStore:
        """The credential store of docker_config (raises CredentialsError, naming the file, for
        one that cannot be read). Build it once and pass it to client() to share helper answers
        between clients."""
        from snapshotter.remote.credentials import CredentialStore

        if not self.docker_config:
            return CredentialStore.anonymous()
        return CredentialStore.from_docker_config(self.docker_config)

    def client(self, credentials: CredentialStore | None = None) -> RegistryClient:
        """A control-plane client; credentials default to this access's own store."""
        from snapshotter.remote.client import RegistryClient

        return RegistryClient(
            self.hosts(),
            credentials if credentials is not None else self.credentials(),
            timeout=self.timeout,
            retries=self.retries,
        )

    def blob_reader(
        self, repo: RepoLike, digest: str, size: int, client: RegistryClient | None = None
    ) -> BlobReader:
        """A Range reader for one blob (with its own client unless one is shared)."""
        from snapshotter.remote.blob import BlobReader

        return BlobReader(
            client if client is not None else self.client(),
            repo,
            digest,
            size,
            timeout=self.timeout,
            retries=self.retries,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hosts_dir": self.hosts_dir,
            "plain_http": list(self.plain_http),
            "docker_config": self.docker_config,
            "timeout": self.timeout,
            "retries": self.retries,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "access") -> RegistryAccess:
        if not isinstance(obj, dict):
            raise AccessSpecError(f"{where}: expected an object, got {type(obj).__name__}")
        unknown = set(obj) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AccessSpecError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("hosts_dir", "docker_config"):
            if not isinstance(obj.get(key, ""), str):
                raise AccessSpecError(f"{where}.{key}: not a string")
        plain_http = obj.get("plain_http", [])
        if not isinstance(plain_http, list) or not all(isinstance(h, str) for h in plain_http):
            raise AccessSpecError(f"{where}.plain_http: not a list of host names")
        timeout = obj.get("timeout", DEFAULT_TIMEOUT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise AccessSpecError(f"{where}.timeout: {timeout!r} is not a positive number")
        retries = obj.get("retries", DEFAULT_RETRIES)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise AccessSpecError(f"{where}.retries: {retries!r} is not a count")
        return cls(
            hosts_dir=obj.get("hosts_dir", ""),
            plain_http=tuple(plain_http),
            docker_config=obj.get("docker_config", ""),
            timeout=float(timeout),
            retries=retries,
        )
