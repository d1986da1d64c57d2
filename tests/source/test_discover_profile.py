"""A startup profile is only a hint: one that cannot be fetched or decoded is logged once and
every layer of the image is still discovered and mounts, without prefetch."""

from __future__ import annotations

import logging
import secrets
import time
import urllib.request
from pathlib import Path

import pytest

from harness.registry import Registry
from snapshotter.fs.background import BackgroundSettings
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.reference import Reference
from snapshotter.source.discover import IndexDiscovery
from snapshotter.trust.policy import TrustPolicy
from tests.source.index_artifacts import (
    content,
    encoded_profile,
    profile_of,
    push_artifact,
    push_image,
)
from tests.source.test_discover_ahead import labels
from tests.source.test_discover_overlap import client_for, discovery_via

pytestmark = pytest.mark.stack


def _delete_blob(registry: Registry, repository: str, digest: str) -> None:
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/blobs/{digest}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202


@pytest.mark.parametrize("breakage", ["deleted from the registry", "not a profile"])
def test_an_unusable_profile_is_logged_once_and_every_layer_mounts(
    breakage: str, registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = f"profile-broken/app{secrets.token_hex(4)}"
    image = push_image(registry.host, repository, tmp_path, layers=3)
    profile = (
        encoded_profile(image, ["l0/f0", "l1/f0", "l2/f0"])
        if breakage == "deleted from the registry"
        else b'{"entries":"not a list","version":1}'
    )
    artifact = push_artifact(
        client_for(registry.host),
        image,
        span_size=64 << 10,
        profile=profile,
        created="2026-01-01T00:00:00.000000Z",
    )
    if breakage == "deleted from the registry":
        _delete_blob(registry, repository, artifact.profile_digest)

    found = discovery_via(registry.host)
    with caplog.at_level(logging.WARNING, logger="lazysnap.discover"):
        specs = [found(labels(image.reference, layer.digest)) for layer in image.layers]
    assert [spec.prefetch_names for spec in specs] == [(), (), ()]
    about_profile = [r for r in caplog.records if artifact.profile_digest in r.getMessage()]
    assert len(about_profile) == 1, [r.getMessage() for r in caplog.records]
    assert "ignoring startup profile" in about_profile[0].getMessage()

    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            64 << 20,
            fetch_timeout=5,
            background=BackgroundSettings(enabled=False),
        )
    )
    mounted: list[Path] = []
    try:
        for n, spec in enumerate(specs):
            mountpoint = tmp_path / f"mnt{n}"
            mountpoint.mkdir()
            lazy.mount_layer(str(mountpoint), spec)
            mounted.append(mountpoint)
            name = f"l{n}/f1"
            assert (mountpoint / name).read_bytes() == content(repository, name)
    finally:
        for mountpoint in mounted:
            lazy.unmount(str(mountpoint))
        lazy.close()


def test_a_profile_the_registry_could_not_serve_is_fetched_again_later(
    registry: Registry, tmp_path: Path
) -> None:
    # A profile lost to a registry hiccup costs one pull its prefetch, not every pull until the
    # daemon restarts; one that does not decode is not fetched again (a blob never changes).
    repository = f"profile-retry/app{secrets.token_hex(4)}"
    image = push_image(registry.host, repository, tmp_path, layers=3)
    names = ["l0/f0", "l1/f0", "l2/f0"]
    profile = encoded_profile(image, names)
    artifact = push_artifact(
        client_for(registry.host),
        image,
        span_size=64 << 10,
        profile=profile,
        created="2026-01-01T00:00:00.000000Z",
    )
    _delete_blob(registry, repository, artifact.profile_digest)
    found = IndexDiscovery(
        client_for(registry.host),
        RegistryAccess(plain_http=(registry.host,)),
        trust=TrustPolicy.permissive(),  # unsigned artifacts of index_artifacts.py
        negative_ttl=0.5,
    )
    first_layer = labels(image.reference, image.layers[0].digest)
    assert found(first_layer).prefetch_names == ()
    back = client_for(registry.host).push_blob(Reference.parse(image.reference).repository, profile)
    assert back == artifact.profile_digest
    time.sleep(0.6)  # past negative_ttl
    expected = profile_of(image, names).names_for(image.layers[0].digest)
    assert expected and found(first_layer).prefetch_names == expected
