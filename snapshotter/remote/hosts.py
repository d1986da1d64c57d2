"""containerd's registry host configuration (certs.d / hosts.toml).

Layout: `<hosts_dir>/<host[:port]>/hosts.toml` (falling back to `<hosts_dir>/_default/hosts.toml`):

    server = "https://registry.example.com"
    [host."https://mirror.example.com"]
      capabilities = ["pull", "resolve"]
      skip_verify = false
      ca = "/etc/certs/mirror-ca.pem"          # or a list
      [host."https://mirror.example.com".header]
        x-custom = "1"

Hosts are tried in file order (mirrors), then the server. Registries listed in `plain_http` (the
`--plain-http` flag) are spoken to over http instead of https.

A hosts.toml is read again when it changes (as containerd reads it per pull): each lookup
stats the candidate files (a few microseconds) and reloads when the file found, its inode,
size or mtime differ from what was read, so a long-running daemon sees an added mirror at once.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from snapshotter.remote.errors import HostsConfigError
from snapshotter.remote.reference import DOCKER_HUB, DOCKER_HUB_ENDPOINT

log = logging.getLogger(__name__)

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# What identifies the contents of a hosts.toml as read: path, inode, size, mtime (ns). None: no
# file (the built-in default host).
_FileId = tuple[str, int, int, int] | None


def normalize_host(host_or_url: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://127.0.0.1:5000` -> `127.0.0.1:5000`."""
    text = host_or_url.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0].lower()
    return "docker.io" if text in _HUB_HOSTS else text


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint for a registry. url is `scheme://host[:port][/prefix]`."""

    url: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    override_path: bool = False  # url already includes the API root (no /v2 added)
    is_mirror: bool = False

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        """host[:port], the key for credentials and tokens."""
        return urlsplit(self.url).netloc

    def api_url(self, path: str) -> str:
        """URL for an API path like `/test/busybox/manifests/latest` (without the /v2 prefix)."""
        base = self.url.rstrip("/")
        return f"{base}{path}" if self.override_path else f"{base}/v2{path}"

    def tls_key(self) -> tuple[bool, tuple[str, ...]]:
        """Hosts with equal keys can share one TLS-configured connection pool."""
        return (self.skip_verify, self.ca)


class HostsConfig:
    """Resolves a registry name to the endpoints to try, from a hosts directory (may be None)."""

    def __init__(
        self, hosts_dir: str | os.PathLike[str] | None = None, *, plain_http: Iterable[str] = ()
    ) -> None:
        self.hosts_dir = os.fspath(hosts_dir) if hosts_dir is not None else None
        self.plain_http = frozenset(plain_http)
        self._cache: dict[str, tuple[_FileId, list[RegistryHost]]] = {}
        self._lock = threading.Lock()  # lookups come from many threads of the daemon

    def hosts_for(self, registry: str, capability: str) -> list[RegistryHost]:
        """Endpoints for registry that offer capability (pull, resolve or push), in try order,
        from its hosts.toml as it is now (read again only when it changed)."""
        file_id = self._file_id(registry)
        with self._lock:
            cached = self._cache.get(registry)
        if cached is not None and cached[0] == file_id:
            hosts = cached[1]
        else:
            hosts = self._load(registry, file_id[0] if file_id is not None else None)
            with self._lock:
                self._cache[registry] = (file_id, hosts)
            if cached is not None:
                log.info(
                    "registry %s: hosts config changed (%s): now %s",
                    registry,
                    file_id[0] if file_id is not None else "removed",
                    [h.url for h in hosts],
                )
        found = [h for h in hosts if capability in h.capabilities]
        if not found:
            raise HostsConfigError(
                f"no host configured for registry {registry} has capability {capability!r}"
            )
        return found

    def _default_server(self, registry: str) -> str:
        endpoint = DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry
        scheme = "http" if registry in self.plain_http else "https"
        return f"{scheme}://{endpoint}"

    def _config_path(self, registry: str) -> str | None:
        if self.hosts_dir is None:
            return None
        for name in (registry, registry.replace(":", "_"), "_default"):
            path = os.path.join(self.hosts_dir, name, "hosts.toml")
            if os.path.isfile(path):
                return path
        return None

    def _file_id(self, registry: str) -> _FileId:
        path = self._config_path(registry)
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None  # removed just now: the default host, until it is back
        return (path, st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self, registry: str, path: str | None) -> list[RegistryHost]:
        if path is None:
            return [RegistryHost(self._default_server(registry))]
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise HostsConfigError(f"cannot read hosts file {path}: {exc}") from None
        hosts: list[RegistryHost] = []
        for url, table in (doc.get("host") or {}).items():
            if not isinstance(table, dict):
                raise HostsConfigError(f"{path}: [host.{url!r}] must be a table")
            hosts.append(self._host(registry, url, table, path, is_mirror=True))
        server = doc.get("server")
        if server is not None and not isinstance(server, str):
            raise HostsConfigError(f"{path}: 'server' must be a string URL")
        server_url = server or self._default_server(registry)
        # A server that is also listed as a [host] entry is not tried twice.
        if all(
            h.url.rstrip("/") != self._url(registry, server_url, path).rstrip("/") for h in hosts
        ):
            hosts.append(self._host(registry, server_url, doc, path, is_mirror=False))
        log.debug("registry %s: hosts %s (from %s)", registry, [h.url for h in hosts], path)
        return hosts

    def _url(self, registry: str, url: str, path: str) -> str:
        if "://" not in url:
            url = f"{'http' if registry in self.plain_http else 'https'}://{url}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise HostsConfigError(f"{path}: invalid host URL {url!r} (want http(s)://host[:port])")
        if registry in self.plain_http and parts.netloc == registry and parts.scheme == "https":
            url = "http" + url[len("https") :]
        return url

    def _host(
        self, registry: str, url: str, table: Mapping[str, Any], path: str, *, is_mirror: bool
    ) -> RegistryHost:
        capabilities = table.get("capabilities", sorted(ALL_CAPABILITIES))
        if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            raise HostsConfigError(f"{path}: capabilities of {url} must be a list of strings")
        unknown = set(capabilities) - ALL_CAPABILITIES
        if unknown:
            log.warning("%s: ignoring unknown capabilities %s of %s", path, sorted(unknown), url)
        skip_verify = table.get("skip_verify", False)
        if not isinstance(skip_verify, bool):
            raise HostsConfigError(f"{path}: skip_verify of {url} must be true or false")
        ca = table.get("ca", [])
        ca_list = [ca] if isinstance(ca, str) else ca
        if not isinstance(ca_list, list) or not all(isinstance(c, str) for c in ca_list):
            raise HostsConfigError(f"{path}: ca of {url} must be a path or a list of paths")
        base = os.path.dirname(path)
        ca_paths = tuple(c if os.path.isabs(c) else os.path.join(base, c) for c in ca_list)
        for ca_path in ca_paths:
            if not os.path.isfile(ca_path):
                raise HostsConfigError(f"{path}: CA file {ca_path} of {url} does not exist")
        header = table.get("header", {})
        if not isinstance(header, dict):
            raise HostsConfigError(f"{path}: header of {url} must be a table")
        headers: list[tuple[str, str]] = []
        for name, value in header.items():
            values = value if isinstance(value, list) else [value]
            headers.extend((str(name), str(v)) for v in values)
        override_path = table.get("override_path", False)
        return RegistryHost(
            url=self._url(registry, url, path),
            capabilities=frozenset(capabilities) & ALL_CAPABILITIES,
            skip_verify=skip_verify,
            ca=ca_paths,
            headers=tuple(headers),
            override_path=bool(override_path),
            is_mirror=is_mirror,
        )
