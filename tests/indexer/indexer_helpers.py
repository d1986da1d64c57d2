"""Helpers for `lazysnap index` tests: unique names, random layers, in-process pushes that work
on docker-registry and peryx alike (skopeo cannot authenticate to peryx), access-log reading."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.images import BuiltImage, file, layer_tar, write_oci_layout
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform, build_index
from snapshotter.remote.reference import Repository

# Writes seen in docker-registry's access log: "PUT /v2/<repo>/manifests/<ref> HTTP/1.1" 201
_WRITE = re.compile(r'"(PUT|POST|PATCH|DELETE) /v2/(\S+) HTTP/[0-9.]+" (\d{3})')


@dataclass(frozen=True)
class Target:
    """A registry under test: host, credentials (None: anonymous), namespace for our repos."""

    host: str
    namespace: str  # first path component (peryx: its index route)
    credentials: Credentials | None

    def client(self) -> RegistryClient:
        creds = {self.host: self.credentials} if self.credentials else None
        return RegistryClient(HostsConfig(plain_http=[self.host]), CredentialStore(creds))


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def unique(prefix: str) -> str:
    """A fresh name, so tests sharing the session registry never see each other's data."""
    return f"{prefix}{secrets.token_hex(4)}"


def random_layer(name: str, size: int) -> bytes:
    """An uncompressed layer tar of incompressible content: a gzip layer of about `size` bytes
    with several files, unique to this call (so no earlier test can have indexed it)."""
    files = [file(f"{name}/f{i}.bin", os.urandom(size // 4)) for i in range(4)]
    return layer_tar([file(f"{name}/README", f"layer {name}\n"), *files])


def build_image(workdir: Path, tag: str, layer_tars: Sequence[bytes]) -> BuiltImage:
    return write_oci_layout(workdir / tag, tag, layer_tars)


def _blob(image: BuiltImage, digest: str) -> bytes:
    return (image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def push_image(
    client: RegistryClient, image: BuiltImage, registry: str, repo: str, tag: str
) -> Descriptor:
    """Push an OCI-layout image in-process (blobs, then the manifest under tag)."""
    target = Repository(registry, repo)
    for layer in image.layers:
        client.push_blob(target, _blob(image, layer.digest), layer.digest)
    client.push_blob(target, _blob(image, image.config_digest), image.config_digest)
    manifest = _blob(image, image.manifest_digest)
    client.push_manifest(target, tag, manifest, OCI_MANIFEST)
    return Descriptor(OCI_MANIFEST, image.manifest_digest, len(manifest))


def push_index(
    client: RegistryClient,
    registry: str,
    repo: str,
    tag: str,
    children: Sequence[tuple[Descriptor, str]],
) -> str:
    """Push an OCI index naming the (already pushed) children with their platforms."""
    entries = [
        Descriptor(d.media_type, d.digest, d.size, platform=Platform.parse(p)) for d, p in children
    ]
    data = build_index(entries)
    return client.push_manifest(Repository(registry, repo), tag, data, OCI_INDEX).digest


def writes_since(log_path: Path, offset: int) -> list[str]:
    """Write requests (PUT/POST/PATCH/DELETE) in docker-registry's access log after offset."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [f"{m[1]} {m[2]} {m[3]}" for m in _WRITE.finditer(text)]
