"""Discovery's lookup of an image (its manifest and its referrers, fetched side by side)
reports what is wrong with the image itself, and finds indexes as a one-at-a-time lookup did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.images import directory, file, layer_tar, push, write_oci_layout
from harness.registry import Registry
from snapshotter.core.layers import RemoteLayerUnavailable
from tests.source.test_discover_ahead import discovery, labels

pytestmark = pytest.mark.stack


def test_an_unknown_manifest_digest_is_the_reported_problem(registry: Registry) -> None:
    missing = "sha256:" + "1" * 64
    request = {
        **labels(f"{registry.host}/lookup/none:1", "sha256:" + "2" * 64),
        "containerd.io/snapshot/cri.manifest-digest": missing,
    }
    with pytest.raises(RemoteLayerUnavailable, match=rf"manifest \S+@{missing} .*not found"):
        discovery(registry)(request)


def test_an_indexed_layer_is_found_and_an_unindexed_image_says_so(
    registry: Registry, tmp_path: Path
) -> None:
    tars = [layer_tar([directory("d"), file(f"d/{n}", os.urandom(50_000))]) for n in "ab"]
    indexed = push(write_oci_layout(tmp_path / "one", "latest", tars), registry.host, "lookup/a")
    plain = push(write_oci_layout(tmp_path / "two", "latest", tars[:1]), registry.host, "lookup/b")
    build = ["index", "build", "--plain-http", "--min-layer-size", "0", indexed.reference]
    built = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *build],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    found = discovery(registry)
    for layer in indexed.layers:
        spec = found(labels(indexed.reference, layer.digest))
        assert spec.blob.digest == layer.digest and spec.index_bytes
    with pytest.raises(RemoteLayerUnavailable, match=r"has none \(looked up via"):
        found(labels(plain.reference, plain.layers[0].digest))
