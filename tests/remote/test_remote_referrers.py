"""Referrers: push an artifact with a subject and find it by artifactType, on docker-registry
(no referrers API -> tag schema) and on peryx (native OCI 1.1 referrers API)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import uuid

import pytest

from harness.peryx import Peryx
from harness.registry import Registry
from harness.registry_calls import list_tags
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.manifest import (
    EMPTY_JSON,
    OCI_INDEX,
    Descriptor,
    build_index,
    sha256_digest,
)
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import (
    fallback_tag,
    find_referrers,
    push_referrer,
    referrer_manifest,
)
from tests.remote.conftest import LogRecorder
from tests.remote.util import push_image

pytestmark = pytest.mark.stack

INDEX_TYPE = "application/vnd.lazysnap.index.v1+json"
OTHER_TYPE = "application/vnd.example.signature.v1"
BLOB_TYPE = "application/vnd.lazysnap.index.layer.v1"


def push_artifact(
    client: RegistryClient,
    repo: Repository,
    subject: Descriptor,
    artifact_type: str,
    verify_delay: float = 0.3,
) -> tuple[str, str]:
    payload = os.urandom(256)
    client.push_blob(repo, payload)
    client.push_blob(repo, EMPTY_JSON)
    layer = Descriptor(BLOB_TYPE, sha256_digest(payload), len(payload))
    manifest = referrer_manifest(subject, artifact_type, [layer], {"dev.lazysnap.note": "test"})
    pushed = push_referrer(client, repo, manifest, verify_delay=verify_delay)
    return pushed.digest, pushed.source


def test_docker_registry_uses_the_tag_schema(registry: Registry, client: RegistryClient) -> None:
    repo = Repository(registry.host, f"test/ref-{uuid.uuid4().hex[:8]}")
    subject = push_image(client, repo, "v1")
    ours, source = push_artifact(client, repo, subject, INDEX_TYPE)
    assert source == "tag-fallback"
    push_artifact(client, repo, subject, OTHER_TYPE)

    found = find_referrers(client, repo, subject.digest, INDEX_TYPE)
    assert found.source == "tag-fallback"
    assert [d.digest for d in found.descriptors] == [ours]
    assert found.descriptors[0].artifact_type == INDEX_TYPE
    assert found.descriptors[0].annotations == {"dev.lazysnap.note": "test"}
    assert len(find_referrers(client, repo, subject.digest).descriptors) == 2
    assert fallback_tag(subject.digest) in list_tags(client, repo)

    nothing = find_referrers(client, repo, "sha256:" + "0" * 64, INDEX_TYPE)
    assert nothing.descriptors == () and nothing.source == "tag-fallback"


def test_peryx_uses_the_referrers_api(peryx_server: Peryx, peryx_client: RegistryClient) -> None:
    repo = Repository(peryx_server.host, f"{peryx_server.route}/ref-{uuid.uuid4().hex[:8]}")
    subject = push_image(peryx_client, repo, "v1")
    ours, source = push_artifact(peryx_client, repo, subject, INDEX_TYPE)
    assert source == "referrers-api"
    push_artifact(peryx_client, repo, subject, OTHER_TYPE)

    found = find_referrers(peryx_client, repo, subject.digest, INDEX_TYPE)
    assert found.source == "referrers-api"
    assert [d.digest for d in found.descriptors] == [ours]
    assert found.descriptors[0].artifact_type == INDEX_TYPE
    assert len(find_referrers(peryx_client, repo, subject.digest).descriptors) == 2
    # No tag index was written: the registry indexes subjects itself.
    assert fallback_tag(subject.digest) not in list_tags(peryx_client, repo)
    empty = find_referrers(peryx_client, repo, "sha256:" + "0" * 64, INDEX_TYPE)
    assert empty.descriptors == () and empty.source == "referrers-api"


def test_tag_index_merge_keeps_an_entry_overwritten_meanwhile(
    registry: Registry, client: RegistryClient, logs: LogRecorder
) -> None:
    """Another pusher that read the tag index before our push writes it back without our
    entry; our post-push check notices and merges again, keeping theirs too."""
    repo = Repository(registry.host, f"test/race-{uuid.uuid4().hex[:8]}")
    subject = push_image(client, repo, "v1")
    theirs, _ = push_artifact(client, repo, subject, INDEX_TYPE)
    tag_ref = Reference(repo.registry, repo.name, tag=fallback_tag(subject.digest), tag_given=True)
    stale_entries = client.get_manifest(tag_ref).manifests  # what the other pusher read: [theirs]

    other = RegistryClient(client.hosts)  # the other pusher
    overwritten = threading.Event()

    def overwrite_once_ours_lands() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(other.get_manifest(tag_ref).manifests) > len(stale_entries):
                other.push_manifest(repo, tag_ref.object, build_index(stale_entries), OCI_INDEX)
                overwritten.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=overwrite_once_ours_lands)
    watcher.start()
    try:
        with logs.at_level(logging.INFO, logger="snapshotter.remote.referrers"):
            ours, _ = push_artifact(client, repo, subject, INDEX_TYPE, verify_delay=1.0)
    finally:
        watcher.join()
        other.close()
    assert overwritten.is_set()
    assert any("merging again" in r.getMessage() for r in logs.records)
    found = {d.digest for d in find_referrers(client, repo, subject.digest, INDEX_TYPE).descriptors}
    assert found == {theirs, ours}


def test_concurrent_pushers_all_survive(registry: Registry, client: RegistryClient) -> None:
    repo = Repository(registry.host, f"test/race-{uuid.uuid4().hex[:8]}")
    subject = push_image(client, repo, "v1")
    clients = [RegistryClient(client.hosts) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            digests = list(
                pool.map(
                    lambda c: push_artifact(c, repo, subject, INDEX_TYPE, verify_delay=0.3)[0],
                    clients,
                )
            )
    finally:
        for c in clients:
            c.close()
    found = {d.digest for d in find_referrers(client, repo, subject.digest, INDEX_TYPE).descriptors}
    assert found == set(digests)
