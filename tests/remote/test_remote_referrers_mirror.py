"""Referrers through a mirror while the upstream registry is unreachable (hosts.toml: a mirror
[host] first, then the server). A mirror without the referrers API answers 404; that must lead
to the tag schema on the mirror, not to a failed lookup because the server after it is down -
otherwise lazysnap loses every lazy layer exactly when the mirror is what keeps a node going."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.procs import free_port
from harness.registry import Registry
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Repository
from snapshotter.remote.referrers import find_referrers
from tests.remote.test_remote_referrers import INDEX_TYPE, push_artifact
from tests.remote.util import push_image

pytestmark = pytest.mark.stack


@pytest.fixture
def mirror_client(registry: Registry, tmp_path: Path) -> Iterator[tuple[RegistryClient, str]]:
    """A client for a registry name whose server nothing listens on, with the session
    docker-registry (no referrers API) as its mirror."""
    upstream = f"127.0.0.1:{free_port()}"
    (tmp_path / upstream).mkdir()
    (tmp_path / upstream / "hosts.toml").write_text(
        f'server = "http://{upstream}"\n'
        f'[host."http://{registry.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    client = RegistryClient(
        HostsConfig(tmp_path), CredentialStore.anonymous(), timeout=10.0, retries=1, backoff=0.05
    )
    yield client, upstream
    client.close()


def test_referrers_found_on_the_mirror_while_the_server_is_down(
    client: RegistryClient,
    registry: Registry,
    mirror_client: tuple[RegistryClient, str],
) -> None:
    name = f"test/ref-mirror-{uuid.uuid4().hex[:8]}"
    direct = Repository(registry.host, name)
    subject = push_image(client, direct, "v1")
    ours, _ = push_artifact(client, direct, subject, INDEX_TYPE)

    through_mirror, upstream = mirror_client
    found = find_referrers(through_mirror, Repository(upstream, name), subject.digest, INDEX_TYPE)

    assert found.source == "tag-fallback"
    assert [d.digest for d in found.descriptors] == [ours]
