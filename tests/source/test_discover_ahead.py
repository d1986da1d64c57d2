"""Discovery against a real registry: an image's indexes are fetched ahead of its Prepares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.images import directory, file, layer_tar, push, write_oci_layout
from harness.registry import Registry
from harness.trust import session_trust_policy
from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import IndexDiscovery

pytestmark = pytest.mark.stack


def labels(image: str, layer_digest: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": f"chain-of-{layer_digest}",
        "containerd.io/snapshot/cri.image-ref": image,
        "containerd.io/snapshot/cri.layer-digest": layer_digest,
    }


def discovery(registry: Registry) -> IndexDiscovery:
    client = RegistryClient(
        HostsConfig(None, plain_http=(registry.host,)), CredentialStore.from_docker_config(None)
    )
    return IndexDiscovery(
        client, RegistryAccess(plain_http=(registry.host,)), trust=session_trust_policy()
    )


def test_the_first_layer_of_an_image_fetches_every_index_at_once(
    registry: Registry, tmp_path: Path
) -> None:
    tars = [layer_tar([directory("data"), file(f"data/{n}", os.urandom(200_000))]) for n in "abc"]
    image = push(write_oci_layout(tmp_path / "layout", "latest", tars), registry.host, "ahead/app")
    build = ["index", "build", "--plain-http", "--min-layer-size", "0", image.reference]
    built = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *build],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    layer_digests = [layer.digest for layer in image.layers]

    first = discovery(registry)
    fresh = discovery(registry)
    since = registry.log_offset()
    bottom = first(labels(image.reference, layer_digests[0]))
    fetched_by_first_prepare = registry.blob_fetches(since)
    others = [first(labels(image.reference, digest)) for digest in layer_digests[1:]]
    # The later Prepares found their indexes already fetched: no registry request of their own.
    assert registry.blob_fetches(since) == fetched_by_first_prepare
    # The three index blobs, each once, the payload of the index artifact's signature and the
    # image config (for the layers' diffIDs).
    assert image.built.config_digest in fetched_by_first_prepare
    assert len(fetched_by_first_prepare) == 5
    assert all(fetch.requests == 1 for fetch in fetched_by_first_prepare.values())
    # Each layer's spec carries its diffID from the config, for the completion check.
    assert [spec.diff_id for spec in (bottom, *others)] == [x.diff_id for x in image.layers]
    # ...and they get exactly what a discovery without the head start gets.
    for digest, spec in zip(layer_digests, [bottom, *others], strict=True):
        assert spec == fresh(labels(image.reference, digest))
    with pytest.raises(RemoteLayerUnavailable, match="not in manifest"):
        first(labels(image.reference, "sha256:" + "0" * 64))
