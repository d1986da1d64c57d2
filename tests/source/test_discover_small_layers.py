"""A layer that `lazysnap pull` labels with a size under min_layer_size falls back to a full
pull at once: discovery asks the registry nothing (here it could not even reach one)."""

from __future__ import annotations

import socket
import time

import pytest

from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import IndexDiscovery
from snapshotter.trust.policy import TrustPolicy

LAYER = "sha256:" + "a" * 64


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _labels(host: str, size: str | None) -> dict[str, str]:
    labels = {
        "containerd.io/snapshot.ref": "sha256:chain",
        "containerd.io/snapshot/cri.image-ref": f"{host}/small/app:1",
        "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "c" * 64,
        "containerd.io/snapshot/cri.layer-digest": LAYER,
    }
    if size is not None:
        labels["containerd.io/snapshot/remote/lazysnap.layer-size"] = size
    return labels


def test_small_labelled_layer_falls_back_without_a_registry_request() -> None:
    host = f"127.0.0.1:{_closed_port()}"
    client = RegistryClient(
        HostsConfig(None, plain_http=(host,)), CredentialStore.anonymous(), retries=0
    )
    discovery = IndexDiscovery(
        client,
        RegistryAccess(plain_http=(host,)),
        trust=TrustPolicy.permissive(),
        min_layer_size=10 << 20,
    )
    started = time.monotonic()
    with pytest.raises(RemoteLayerUnavailable, match=r"is 1000 bytes, under min_layer_size"):
        discovery(_labels(host, "1000"))
    assert time.monotonic() - started < 0.5
    # Without the label (a CRI pull) the size comes from the registry, which is down here.
    with pytest.raises(RemoteLayerUnavailable) as unlabelled:
        discovery(_labels(host, None))
    assert "min_layer_size" not in str(unlabelled.value)
    # A large layer is looked up as usual.
    with pytest.raises(RemoteLayerUnavailable) as large:
        discovery(_labels(host, str(50 << 20)))
    assert "min_layer_size" not in str(large.value)
