"""docker-registry 2.8 on a free loopback port, optionally behind basic or token auth.

The registry logs every request in Apache combined format; `blob_fetches` turns that into
per-digest request and byte counts so tests can assert how much of a blob a lazy pull read.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import HarnessError, Service, free_port, run, spawn

REGISTRY_BINARY = "docker-registry"

# 127.0.0.1 - - [22/Nov/2026:20:14:00 +0000] "GET /v2/test/bb/blobs/sha256:ab.. HTTP/1.1" 206 10 ...
_ACCESS_LINE = re.compile(
    r'"(?P<method>[A-Z]+) /v2/(?P<repo>.+?)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)(?:\?\S*)? '
    r'HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)

_MANIFEST_PUT = re.compile(
    r'"PUT /v2/(?P<repo>.+?)/manifests/(?P<reference>[^ ?]+)(?:\?\S*)? HTTP/[0-9.]+" '
    r"(?P<status>\d{3})"
)


@dataclass(frozen=True)
class TokenAuth:
    """Bearer token auth (distribution's `auth.token`): the registry trusts tokens signed by a
    certificate in rootcertbundle and sends clients to realm to get one."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class NotificationEndpoint:
    """A `notifications.endpoints` entry: the registry POSTs event envelopes (pushes, pulls) to
    url with these headers; after threshold failures in a row it waits backoff."""

    url: str
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    name: str = "lazysnap-test"
    timeout: str = "5s"
    threshold: int = 3
    backoff: str = "1s"


@dataclass(frozen=True)
class BlobFetches:
    """Blob GETs of one digest seen in the access log."""

    requests: int
    bytes: int


@dataclass
class Registry:
    base: Path
    port: int
    service: Service = field(repr=False)
    config_path: Path
    basic_auth: Mapping[str, str] | None = None
    token_auth: TokenAuth | None = None

    @property
    def host(self) -> str:
        """host:port as it appears in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def log_offset(self) -> int:
        """Current end of the access log: pass it to blob_fetches(since=...) to count only
        the requests that come after this point."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_log_quiet(self, quiet: float = 0.2, timeout: float = 10.0) -> None:
        """Wait until the access log stops growing: the registry writes a request's line only
        after the response went out, so a client can finish before its line exists."""
        deadline = time.monotonic() + timeout
        size, stable_since = self.log_offset(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.log_offset()
            if now != size:
                size, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                return

    def blob_fetches(self, since: int = 0, until: int | None = None) -> dict[str, BlobFetches]:
        """Blob GET requests and response body bytes per digest (HEADs are not fetches),
        from log offset `since` on (see log_offset), up to offset `until` if given (requests
        whose line the registry wrote by then: responses finished by then). Waits for the log
        to settle first."""
        self.wait_log_quiet()
        totals: dict[str, BlobFetches] = {}
        with open(self.log_path, "rb") as log:
            log.seek(since)
            position = since
            for raw in log:
                position += len(raw)
                if until is not None and position > until:
                    break
                match = _ACCESS_LINE.search(raw.decode(errors="replace"))
                if match is None or match["method"] != "GET":
                    continue
                if not match["status"].startswith("2"):
                    continue
                size = 0 if match["size"] == "-" else int(match["size"])
                old = totals.get(match["digest"], BlobFetches(0, 0))
                totals[match["digest"]] = BlobFetches(old.requests + 1, old.bytes + size)
        return totals

    def manifest_puts(self, since: int = 0) -> dict[tuple[str, str], int]:
        """Successful manifest PUTs per (repository, tag or digest) from log offset since on:
        how many times something was pushed under that name (waits for the log to settle)."""
        self.wait_log_quiet()
        puts: dict[tuple[str, str], int] = {}
        with open(self.log_path, "rb") as log:
            log.seek(since)
            for raw in log:
                match = _MANIFEST_PUT.search(raw.decode(errors="replace"))
                if match is not None and match["status"].startswith("2"):
                    key = (match["repo"], match["reference"])
                    puts[key] = puts.get(key, 0) + 1
        return puts

    @property
    def storage(self) -> Path:
        """The filesystem driver's root: blob bytes are under
        docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data."""
        return self.base / "data"

    def blob_path(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hexdigest[:2]
            / hexdigest
            / "data"
        )

    def stop(self) -> None:
        self.service.stop()

    def alive(self) -> bool:
        return self.service.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start again after stop(): same port, config and storage (what a registry restart
        looks like to its clients). Raises HarnessError if the port was taken meanwhile."""
        if self.service.alive():
            raise HarnessError(
                f"registry on {self.host} is already running (pid {self.service.pid})"
            )
        self.service = spawn(
            "docker-registry", [REGISTRY_BINARY, "serve", str(self.config_path)], self.log_path
        )
        url = self.url
        try:
            self.service.wait_until(lambda: _answers_v2(url), "GET /v2/ answers", timeout)
        except HarnessError:
            self.service.stop()
            raise


def _write_config(
    base: Path,
    port: int,
    basic_auth: Mapping[str, str] | None,
    token_auth: TokenAuth | None,
    notifications: NotificationEndpoint | None = None,
) -> Path:
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(base / "data")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "redirect": {"disable": True},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if basic_auth is not None and token_auth is not None:
        raise HarnessError("registry: choose basic auth or token auth, not both")
    if basic_auth is not None:
        if shutil.which("htpasswd") is None:
            raise HarnessError("registry basic auth needs htpasswd (apt-get install apache2-utils)")
        lines = []
        for user, password in basic_auth.items():
            # distribution only accepts bcrypt entries.
            out = run(["htpasswd", "-iBn", user], f"htpasswd for {user}", input_text=password)
            lines.append(out.stdout.strip())
        htpasswd = base / "htpasswd"
        htpasswd.write_text("\n".join(lines) + "\n")
        config["auth"] = {"htpasswd": {"realm": "lazysnap-test", "path": str(htpasswd)}}
    if token_auth is not None:
        if not token_auth.rootcertbundle.is_file():
            raise HarnessError(f"registry token auth: no such file {token_auth.rootcertbundle}")
        config["auth"] = {
            "token": {
                "realm": token_auth.realm,
                "service": token_auth.service,
                "issuer": token_auth.issuer,
                "rootcertbundle": str(token_auth.rootcertbundle),
            }
        }
    if notifications is not None:
        config["notifications"] = {
            "endpoints": [
                {
                    "name": notifications.name,
                    "url": notifications.url,
                    "headers": {k: list(v) for k, v in notifications.headers.items()},
                    "timeout": notifications.timeout,
                    "threshold": notifications.threshold,
                    "backoff": notifications.backoff,
                }
            ]
        }
    path = base / "config.yml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def _answers_v2(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, just wants credentials
    except OSError:
        return False


def start_registry(
    base: Path,
    *,
    basic_auth: Mapping[str, str] | None = None,
    token_auth: TokenAuth | None = None,
    port: int | None = None,
    notifications: NotificationEndpoint | None = None,
) -> Registry:
    """Start docker-registry under base (data, config, log) and wait until /v2/ answers.
    notifications: an endpoint the registry sends its push/pull events to."""
    if shutil.which(REGISTRY_BINARY) is None:
        raise HarnessError(f"{REGISTRY_BINARY} not found (apt-get install docker-registry)")
    base.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):  # a free port can be taken between probe and bind
        chosen = port or free_port()
        config = _write_config(base, chosen, basic_auth, token_auth, notifications)
        service = spawn(
            "docker-registry", [REGISTRY_BINARY, "serve", str(config)], base / "registry.log"
        )
        registry = Registry(base, chosen, service, config, basic_auth, token_auth)
        url = registry.url
        try:
            service.wait_until(lambda: _answers_v2(url), "GET /v2/ answers", 30)  # noqa: B023
        except HarnessError as exc:
            service.stop()
            if port is None and "address already in use" in str(exc):
                continue
            raise
        return registry
    raise HarnessError("registry: no free port after 3 attempts")


def registry_running_at(base: Path, port: int, pid: int) -> Registry:
    """Re-attach to a registry started by an earlier process (the `up`/`down` CLI)."""
    service = Service("docker-registry", pid, base / "registry.log")
    return Registry(base, port, service, base / "config.yml")


__all__ = [
    "BlobFetches",
    "NotificationEndpoint",
    "Registry",
    "TokenAuth",
    "registry_running_at",
    "start_registry",
]
