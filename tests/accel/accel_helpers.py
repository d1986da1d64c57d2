"""Running `lazysnap accel serve` as a real process in tests, and talking to it."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.images import BuiltImage, sha256_digest
from harness.postgres import Postgres, start_postgres
from harness.procs import HarnessError, Service, log_tail, run, spawn

CONVERSIONS = "/api/v1/conversions"
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/events")


def accel_command() -> list[str]:
    """The `lazysnap` of this interpreter's environment (the venv the tests run in)."""
    return [sys.executable, "-m", "snapshotter.cli", "accel", "serve"]


@dataclass
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class AccelProcess:
    service: Service
    port: int
    token: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """token: the bearer token to send (default: the service's own)."""
        sent = dict(headers or {})
        bearer = self.token if token is None else token
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        if body is not None:
            sent.setdefault("Content-Type", "application/vnd.docker.distribution.events.v1+json")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return Response(resp.status, json.loads(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers))

    def raw(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Status and body bytes (for answers that are not a JSON object), with the token."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def tasks(self, status: str | None = None) -> list[dict[str, Any]]:
        """GET /api/v1/conversions[?status=]: the task list, newest first."""
        code, body = self.raw("GET", CONVERSIONS + (f"?status={status}" if status else ""))
        if code != 200:
            raise HarnessError(f"GET {CONVERSIONS}: HTTP {code} {body[:300]!r}")
        tasks: list[dict[str, Any]] = json.loads(body)
        return tasks

    def status(self) -> dict[str, Any]:
        answer = self.request("GET", "/status")
        if answer.status != 200:
            raise HarnessError(f"GET /status: HTTP {answer.status} {answer.body}")
        return answer.body

    def jobs(
        self, digest: str | None = None, repository: str | None = None
    ) -> list[dict[str, Any]]:
        """Every job the status lists (queued, running, done, failed), oldest first."""
        status = self.status()
        found = [job for state in ("done", "failed", "running", "queued") for job in status[state]]
        found = [
            job
            for job in found
            if (digest is None or job["digest"] == digest)
            and (repository is None or job["repository"] == repository)
        ]
        return sorted(found, key=lambda job: int(job["id"]))

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Poll check() until it returns something truthy; fail with the service log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            if not self.service.alive():
                break
            time.sleep(0.1)
        raise AssertionError(
            f"accel: {what} not seen within {timeout:.0f} s; status {json.dumps(self.status())}\n"
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> int | None:
        return self.service.stop(signum=signal.SIGTERM)


def start_accel(
    base: Path,
    args: Sequence[str],
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AccelProcess:
    """Start `lazysnap accel serve --listen 127.0.0.1:0 ARGS` (the service picks a free port
    and logs it); token: written to base/token and passed as --token-file."""
    base.mkdir(parents=True, exist_ok=True)
    argv = [*accel_command(), "--listen", "127.0.0.1:0", *args]
    if "--store" not in args and "--state-dir" not in args:
        argv += ["--state-dir", str(base / "state")]  # never the host's /var/lib
    if token is not None:
        token_file = base / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        argv += ["--token-file", str(token_file)]
    log_path = base / "accel.log"
    service = spawn(
        "lazysnap accel",
        argv,
        log_path,
        env=dict(env) if env is not None else None,
        cwd=Path(__file__).resolve().parents[2],
    )
    found: list[int] = []

    def listening() -> bool:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    service.wait_until(listening, "listening line in its log", timeout=30)
    return AccelProcess(service, found[0], token)


def distribution_envelope(registry: str, repository: str, digest: str, tag: str) -> bytes:
    """A manifest push event shaped as docker-registry 2.8 sends it (captured here), for
    the tests that must play the registry's part (one that is down, a wrong token)."""
    event = {
        "id": "0b8f5e43-5a8c-4d8c-9a36-3f0f3bb1a0c1",
        "timestamp": "2026-11-22T20:51:14.574859847Z",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "repository": repository,
            "url": f"http://{registry}/v2/{repository}/manifests/{digest}",
            "tag": tag,
        },
        "request": {"host": registry, "method": "PUT", "useragent": "skopeo/1.9.3"},
        "actor": {},
        "source": {"addr": "test:0"},
    }
    return json.dumps({"events": [event]}).encode()


def harbor_push(
    registry: str, repository: str, tag: str, digest: str, *, cloudevents: bool = False
) -> bytes:
    """Harbor's artifact push webhook as Harbor 2.x sends it: the Default payload format
    (type PUSH_ARTIFACT, event_data) or the CloudEvents one (type harbor.artifact.pushed,
    data)."""
    namespace, _, name = repository.rpartition("/")
    data = {
        "resources": [
            {"digest": digest, "tag": tag, "resource_url": f"{registry}/{repository}:{tag}"}
        ],
        "repository": {
            "date_created": 1764979200,
            "name": name,
            "namespace": namespace,
            "repo_full_name": repository,
            "repo_type": "private",
        },
    }
    if cloudevents:
        return json.dumps(
            {
                "specversion": "1.0",
                "id": "4b7e3c52-8d0a-4f7e-9a58-1d2f0c6b9e21",
                "requestid": "b1a0c8f2-6d3e-4c57-8e9b-2f4a6d1c3e50",
                "source": "/projects/2/webhook/policies/3",
                "type": "harbor.artifact.pushed",
                "datacontenttype": "application/json",
                "time": "2026-12-06T10:00:00Z",
                "data": data,
                "operator": "admin",
            }
        ).encode()
    return json.dumps(
        {"type": "PUSH_ARTIFACT", "occur_at": 1764979200, "operator": "admin", "event_data": data}
    ).encode()


def relabel_layers(image: BuiltImage, media_type: str) -> BuiltImage:
    """The same image with every layer declared as media_type (e.g. plain tar bytes declared
    gzip, as a buggy build tool would push them); the layout's tag points at the new manifest."""
    blobs = image.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / image.manifest_digest.split(":", 1)[1]).read_bytes())
    for layer in manifest["layers"]:
        layer["mediaType"] = media_type
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    digest = sha256_digest(data)
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    index_path = image.layout / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["manifests"]:
        if entry["digest"] == image.manifest_digest:
            entry["digest"], entry["size"] = digest, len(data)
    index_path.write_text(json.dumps(index))
    layers = tuple(dataclasses.replace(layer, media_type=media_type) for layer in image.layers)
    return dataclasses.replace(image, manifest_digest=digest, layers=layers)


def write_platform_index(layout: Path, tag: str, platforms: Mapping[str, BuiltImage]) -> str:
    """Tag an OCI index over images already in layout (platform "os/arch" -> image); returns
    the index digest. Push it with push_all."""
    manifests = []
    for platform, image in platforms.items():
        os_name, arch = platform.split("/", 1)
        blob = layout / "blobs" / "sha256" / image.manifest_digest.split(":", 1)[1]
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": blob.stat().st_size,
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    data = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
    digest = sha256_digest(data)
    (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
    top = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": len(data),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    return digest


def push_all(layout: Path, tag: str, reference: str) -> None:
    """skopeo copy --all: every platform manifest, then the index (digests kept)."""
    argv = ["skopeo", "copy", "--quiet", "--all", "--preserve-digests"]
    argv += ["--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{reference}"]
    run(argv, f"push {reference}", timeout=300)


def postgres_or_skip(base: Path) -> Postgres:
    """A throw-away PostgreSQL server, or a skip (an error under LAZYSNAP_REQUIRE_STACK=1)
    when the server package or the psycopg driver is missing."""
    import os

    import pytest

    try:
        import psycopg  # noqa: F401

        return start_postgres(base)
    except (ImportError, HarnessError) as exc:
        if os.environ.get("LAZYSNAP_REQUIRE_STACK") == "1":
            pytest.fail(f"PostgreSQL job store tests cannot run: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL job store tests need the server and psycopg: {exc}")
