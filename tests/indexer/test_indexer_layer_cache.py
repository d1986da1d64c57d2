"""The layer index cache against real registries: adopting a cached index blob into a repository
on another registry (no cross-repo mount possible there, so the bytes are copied)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from indexer_helpers import unique

from harness.peryx import Peryx
from harness.registry import Registry
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.indexer.layer_cache import adopt
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import sha256_digest
from snapshotter.remote.reference import Repository
from snapshotter.vocabulary.artifact import IndexedLayer

pytestmark = pytest.mark.stack


@pytest.fixture
def client(registry: Registry, peryx: Peryx) -> Iterator[RegistryClient]:
    """One client for both registries, the way the indexer holds one for all its hosts."""
    creds = CredentialStore({peryx.host: Credentials("lazysnap", peryx.token)})
    with RegistryClient(HostsConfig(plain_http=[registry.host, peryx.host]), creds) as made:
        yield made


def test_index_blob_larger_than_a_config_is_copied_across_registries(
    client: RegistryClient, registry: Registry, peryx: Peryx
) -> None:
    # Bigger than get_blob's default cap for small blobs (64 MiB), well under the largest index
    # blob the snapshotter itself accepts: a cache hit must be usable wherever discovery is.
    size = (64 << 20) + 4096
    assert size < MAX_INDEX_BLOB_SIZE
    blob = bytes(range(256)) * (size // 256)
    digest = sha256_digest(blob)
    cache = Repository(registry.host, f"{unique('ix')}/lazysnap-index-cache")
    target = Repository(peryx.host, f"{peryx.route}/{unique('app')}")
    client.push_blob(cache, blob, digest)
    indexed = IndexedLayer("sha256:" + "a" * 64, digest, len(blob))

    assert adopt(client, cache, target, indexed) == "copied"
    assert client.blob_exists(target, digest)
    assert adopt(client, cache, target, indexed) == "present"
