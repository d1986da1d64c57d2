"""hosts.toml mirrors in front of a real docker-registry (a dead mirror, a mirror without the
content, per-host headers), and pushing an OCI image layout directory."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.procs import free_port
from harness.registry import Registry
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.layout import push_oci_layout
from snapshotter.remote.manifest import OCI_MANIFEST, sha256_digest
from snapshotter.remote.reference import Reference, Repository
from tests.remote.util import CONFIG_TYPE, LAYER_TYPE, push_image

pytestmark = pytest.mark.stack


@pytest.fixture
def empty_mirror() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A mirror that has nothing (404 for everything); records the headers it got."""
    seen: list[dict[str, str]] = []

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_dead_and_empty_mirrors_fall_through_to_the_server(
    registry: Registry,
    client: RegistryClient,
    empty_mirror: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    repo = Repository(registry.host, f"test/mirror-{uuid.uuid4().hex[:8]}")
    layer = os.urandom(20_000)
    push_image(client, repo, "v1", layer=layer)
    mirror, seen = empty_mirror
    dead = f"127.0.0.1:{free_port()}"
    config = tmp_path / registry.host / "hosts.toml"
    config.parent.mkdir()
    config.write_text(
        f'server = "http://{registry.host}"\n'
        f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n'
        f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
        f'  [host."http://{mirror}".header]\n    x-mirror-key = "m-1"\n'
    )
    with RegistryClient(HostsConfig(tmp_path), retries=1, backoff=0.01, timeout=5) as mirrored:
        manifest = mirrored.get_manifest(
            Reference(repo.registry, repo.name, tag="v1", tag_given=True)
        )
        assert manifest.layers[0].digest == sha256_digest(layer)
        with BlobReader(mirrored, repo, sha256_digest(layer), len(layer)) as reader:
            assert reader.read(0, 100) == layer[:100]
            asked_mirror = len(seen)
            assert reader.read(100, 100) == layer[100:200]
            assert len(seen) == asked_mirror  # sticky: the server answered, mirrors are skipped
    assert seen and all(h.get("x-mirror-key") == "m-1" for h in seen)


def write_layout(base: Path, tag: str) -> tuple[bytes, bytes]:
    blobs = base / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"digest": sha256_digest(data), "size": len(data)}

    layer = os.urandom(3000)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    # umoci writes manifests without mediaType: the layout helper must cope.
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": CONFIG_TYPE, **put(config)},
            "layers": [{"mediaType": LAYER_TYPE, **put(layer)}],
        }
    ).encode()
    entry = {
        "mediaType": OCI_MANIFEST,
        **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (base / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return manifest, layer


def test_push_oci_layout(registry: Registry, client: RegistryClient, tmp_path: Path) -> None:
    manifest, layer = write_layout(tmp_path / "layout", "latest")
    ref = Reference.parse(f"{registry.host}/test/layout-{uuid.uuid4().hex[:8]}:latest")
    pushed = push_oci_layout(client, tmp_path / "layout", ref)
    assert pushed.digest == sha256_digest(manifest)
    assert client.get_manifest(ref).data == manifest
    assert client.get_blob(ref.repository, sha256_digest(layer)) == layer

    (tmp_path / "layout" / "blobs" / "sha256" / hashlib.sha256(layer).hexdigest()).unlink()
    other = Reference.parse(f"{registry.host}/test/layout-{uuid.uuid4().hex[:8]}:latest")
    with pytest.raises(RegistryError, match=f"blob {sha256_digest(layer)} is missing"):
        push_oci_layout(client, tmp_path / "layout", other)
    config_digest = json.loads(manifest)["config"]["digest"]
    assert not client.blob_exists(other.repository, config_digest)  # nothing half-pushed
    with pytest.raises(RegistryError, match="no single image named 'v9'"):
        push_oci_layout(client, tmp_path / "layout", other, layout_ref="v9")
