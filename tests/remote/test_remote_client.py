"""RegistryClient against a real docker-registry 2.8: manifests, blobs, uploads, tags,
platform resolution (including a sparse index)."""

from __future__ import annotations

import json
import logging
import os
import uuid

import pytest

from harness.registry import Registry
from harness.registry_calls import delete_manifest, get_children, list_tags
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import (
    BlobNotFound,
    DigestMismatch,
    ManifestNotFound,
    PlatformNotFound,
)
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Platform, sha256_digest
from snapshotter.remote.reference import Reference, Repository
from tests.remote.conftest import LogRecorder
from tests.remote.util import index_bytes, push_image

pytestmark = pytest.mark.stack


def fresh_repo(registry: Registry) -> Repository:
    return Repository(registry.host, f"test/client-{uuid.uuid4().hex[:8]}")


def test_manifest_roundtrip_by_tag_and_digest(registry: Registry, client: RegistryClient) -> None:
    repo = fresh_repo(registry)
    desc = push_image(client, repo, "v1")
    by_tag = client.get_manifest(Reference(repo.registry, repo.name, tag="v1"))
    assert by_tag.digest == desc.digest == sha256_digest(by_tag.data)
    assert by_tag.media_type == OCI_MANIFEST
    assert len(by_tag.layers) == 1 and by_tag.config is not None
    by_digest = client.get_manifest(Reference(repo.registry, repo.name, digest=desc.digest))
    assert by_digest.data == by_tag.data
    assert str(by_digest.reference) == f"{repo}@{desc.digest}"
    with pytest.raises(ManifestNotFound, match=f"{repo}:nope"):
        client.get_manifest(Reference(repo.registry, repo.name, tag="nope", tag_given=True))


def test_tags_are_listed_across_pages(registry: Registry, client: RegistryClient) -> None:
    repo = fresh_repo(registry)
    desc = push_image(client, repo, "a")
    manifest = client.get_manifest(Reference(repo.registry, repo.name, digest=desc.digest))
    for tag in ("b", "c"):
        client.push_manifest(repo, tag, manifest.data, OCI_MANIFEST)
    assert sorted(list_tags(client, repo, page_size=1)) == ["a", "b", "c"]


def test_blob_upload_monolithic_chunked_and_mounted(
    registry: Registry, client: RegistryClient
) -> None:
    repo = fresh_repo(registry)
    small = os.urandom(1000)
    big = os.urandom(3 * 65536 + 17)
    assert client.push_blob(repo, small) == sha256_digest(small)
    assert client.push_blob(repo, big, chunk_size=65536) == sha256_digest(big)
    assert client.get_blob(repo, sha256_digest(big)) == big
    with client.stream_blob(repo, sha256_digest(small)) as stream:
        assert stream.read() == small

    other = fresh_repo(registry)
    offset = registry.log_offset()
    client.push_blob(other, big, mount_from=repo)
    assert client.blob_exists(other, sha256_digest(big))
    log = registry.log_path.read_bytes()[offset:].decode(errors="replace")
    assert "mount=" in log and "PATCH" not in log  # mounted, not re-uploaded
    assert not client.blob_exists(other, sha256_digest(b"never pushed"))
    with pytest.raises(BlobNotFound, match=sha256_digest(b"never pushed")):
        client.get_blob(other, sha256_digest(b"never pushed"))


def test_blob_from_file_path(registry: Registry, client: RegistryClient, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "layer.bin"
    data = os.urandom(200_000)
    path.write_bytes(data)
    repo = fresh_repo(registry)
    digest = client.push_blob(repo, path, chunk_size=50_000)
    assert digest == sha256_digest(data) and client.get_blob(repo, digest) == data


def test_stream_blob_detects_a_wrong_size(registry: Registry, client: RegistryClient) -> None:
    repo = fresh_repo(registry)
    data = os.urandom(5000)
    digest = client.push_blob(repo, data)
    with (
        client.stream_blob(repo, digest, size=4000) as stream,
        pytest.raises(DigestMismatch, match=digest),
    ):
        stream.read()


def test_platform_resolution_and_sparse_index(
    registry: Registry, client: RegistryClient, logs: LogRecorder
) -> None:
    repo = fresh_repo(registry)
    plats = [
        ("linux", "amd64", ""),
        ("linux", "arm64", ""),
        ("linux", "arm", "v7"),
        ("linux", "s390x", ""),
    ]
    children = [(push_image(client, repo, None, platform=p), p) for p in plats]
    data = index_bytes(children)
    client.push_manifest(repo, "multi", data, OCI_INDEX)
    index = client.get_manifest(Reference(repo.registry, repo.name, tag="multi", tag_given=True))
    assert index.is_index
    assert (
        client.resolve_platform(index, Platform.parse("linux/arm64/v8")).digest
        == children[1][0].digest
    )
    assert (
        client.resolve_platform(index, Platform.parse("linux/aarch64")).digest
        == children[1][0].digest
    )
    assert (
        client.resolve_platform(index, Platform.parse("linux/x86_64")).digest
        == children[0][0].digest
    )
    with pytest.raises(PlatformNotFound, match="windows/amd64"):
        client.resolve_platform(index, Platform.parse("windows/amd64"))

    # Make it sparse: the s390x child disappears from the registry.
    delete_manifest(client, repo, children[3][0].digest)
    with pytest.raises(PlatformNotFound, match=f"linux/s390x as {children[3][0].digest}.*sparse"):
        client.resolve_platform(index, Platform.parse("linux/s390x"))
    with logs.at_level(logging.WARNING):
        fetched = get_children(client, index)
    assert [m.digest for m in fetched] == [c[0].digest for c in children[:3]]
    assert any("skipping absent child" in r.getMessage() for r in logs.records)
    with pytest.raises(PlatformNotFound, match="asked-for platform linux/s390x"):
        get_children(client, index, [Platform.parse("linux/s390x")])
    assert [m.digest for m in get_children(client, index, [Platform.parse("linux/arm/v7")])] == [
        children[2][0].digest
    ]
    assert json.loads(fetched[0].data)["mediaType"] == OCI_MANIFEST


def test_get_blob_returns_every_byte_of_a_multi_megabyte_blob(
    registry: Registry, client: RegistryClient
) -> None:
    # Index blobs of big layers are several MiB; the stream hands them out in 1 MiB chunks.
    repo = fresh_repo(registry)
    data = os.urandom(3 * (1 << 20) + 5)
    digest = client.push_blob(repo, data)
    assert client.get_blob(repo, digest) == data
