"""Discovery's part in the completion check, against a real registry: each layer's spec gets
its diffID from the image config (none, logged, when the config cannot be read), and an index
blob in the node's refusal ledger makes the Prepare fall back (reason refused_index)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness.forge import genuine_index
from harness.images import PushedImage, directory, file, layer_tar, push, write_oci_layout
from harness.registry import Registry
from harness.trust import session_trust_policy
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.lazylayers.refusals import RefusalLedger, RefusedIndex
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import IndexDiscovery

pytestmark = pytest.mark.stack


def _labels(image: str, layer_digest: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": f"chain-of-{layer_digest}",
        "containerd.io/snapshot/cri.image-ref": image,
        "containerd.io/snapshot/cri.layer-digest": layer_digest,
    }


def _client(registry: Registry) -> RegistryClient:
    hosts = HostsConfig(None, plain_http=(registry.host,))
    return RegistryClient(hosts, CredentialStore.anonymous())


def _indexed_image(registry: Registry, tmp_path: Path, repository: str) -> PushedImage:
    tar = layer_tar([directory("data"), file("data/a", os.urandom(100_000))])
    image = push(write_oci_layout(tmp_path / "layout", "latest", [tar]), registry.host, repository)
    build = ["index", "build", "--plain-http", "--min-layer-size", "0", image.reference]
    built = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *build], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    return image


def test_without_a_readable_config_the_spec_has_no_diff_id_and_says_why(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = _indexed_image(registry, tmp_path, "completion/noconfig")
    config = image.built.config_digest
    url = f"http://{registry.host}/v2/{image.repository}/blobs/{config}"
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE")) as answer:
        assert answer.status == 202
    [layer] = image.layers
    found = IndexDiscovery(
        _client(registry), RegistryAccess(plain_http=(registry.host,)), trust=session_trust_policy()
    )
    with caplog.at_level(logging.WARNING, logger="lazysnap.discover"):
        spec = found(_labels(image.reference, layer.digest))
    assert spec.diff_id == ""  # the layer still mounts; the check can compare its TOC only
    assert f"image config of {image.reference}@" in caplog.text
    assert "checked against their TOC only" in caplog.text


def test_a_refused_index_blob_falls_back_naming_the_refusal(
    registry: Registry, tmp_path: Path
) -> None:
    image = _indexed_image(registry, tmp_path, "completion/refused")
    [layer] = image.layers
    client = _client(registry)
    ledger = RefusalLedger(str(tmp_path / "root"))
    blobs = genuine_index(client, image.reference, layer.digest)
    found = IndexDiscovery(
        client,
        RegistryAccess(plain_http=(registry.host,)),
        trust=session_trust_policy(),
        refusals=ledger,
    )
    spec = found(_labels(image.reference, layer.digest))
    assert spec.diff_id == layer.diff_id and spec.image == image.reference
    assert spec.artifact_digest.startswith("sha256:")
    ledger.record_refusal(RefusedIndex(blobs.index_digest, layer.digest, "mode differs"))
    with pytest.raises(RemoteLayerUnavailable) as refused:
        found(_labels(image.reference, layer.digest))
    assert refused.value.reason is FallbackReason.REFUSED_INDEX
    assert f"index blob {blobs.index_digest}" in str(refused.value)
    assert "mode differs" in str(refused.value)
