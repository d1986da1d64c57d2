"""The first Prepare of an image waits for discovery's registry round trips: the artifact
manifests the referrers lookup lists go out together, and so do the index blobs and the startup
profile. Seen through a proxy in front of the real registry that holds requests until they
overlap (tests/source/gated_proxy.py); with answers arriving out of order the newest artifact
still wins as before."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.registry import Registry
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.source.discover import IndexDiscovery
from snapshotter.trust.policy import TrustPolicy
from tests.source.gated_proxy import GatedProxy
from tests.source.index_artifacts import encoded_profile, push_artifact, push_image
from tests.source.test_discover_ahead import labels

pytestmark = pytest.mark.stack


@pytest.fixture
def proxy(registry: Registry) -> Iterator[GatedProxy]:
    gated = GatedProxy(registry.host).start()
    yield gated
    gated.stop()


def client_for(host: str) -> RegistryClient:
    return RegistryClient(HostsConfig(None, plain_http=(host,)), CredentialStore.anonymous())


def discovery_via(host: str) -> IndexDiscovery:
    return IndexDiscovery(
        # The artifacts here are pushed unsigned (index_artifacts.py): this is about the
        # lookup's round trips, trust is tests/trust's subject.
        client_for(host),
        RegistryAccess(plain_http=(host,)),
        trust=TrustPolicy.permissive(),
    )


def manifest_get(digest: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "GET" and path.endswith(f"/manifests/{digest}")


def test_artifacts_index_blobs_and_profile_are_requested_together(
    registry: Registry, proxy: GatedProxy, tmp_path: Path
) -> None:
    repository = f"overlap/app{secrets.token_hex(4)}"
    image = push_image(registry.host, repository, tmp_path, layers=3)
    direct = client_for(registry.host)
    indexed = push_artifact(direct, image, span_size=64 << 10)
    # `index build --profile` re-pushes the same indexes with a profile: a second artifact.
    profile = encoded_profile(image, ["l0/f1", "l2/f0", "l1/f2"])
    profiled = push_artifact(
        direct, image, span_size=64 << 10, profile=profile, created="2026-01-01T00:00:00.000000Z"
    )
    artifacts = proxy.gate(
        lambda method, path: (
            method == "GET" and path.rsplit("/", 1)[-1] in (indexed.digest, profiled.digest)
        ),
        together=2,
    )
    blobs = proxy.gate(lambda method, path: method == "GET" and "/blobs/" in path, together=5)

    through_proxy = f"{proxy.host}/{repository}:v1"
    found = discovery_via(proxy.host)
    layer_digests = [layer.digest for layer in image.layers]
    bottom = found(labels(through_proxy, layer_digests[0]))
    others = [found(labels(through_proxy, digest)) for digest in layer_digests[1:]]

    assert artifacts.peak == 2  # both artifact manifests in flight at once
    # three index blobs, the profile and the image config (diffIDs) in flight at once
    assert blobs.peak == 5
    # Each was fetched once: the later Prepares found theirs ahead.
    fetched = proxy.blob_gets()
    assert len(fetched) == len(set(fetched)) == 5
    specs = [bottom, *others]
    assert [spec.index_bytes for spec in specs] == [
        indexed.index_bytes[digest] for digest in layer_digests
    ]
    assert [spec.prefetch_names for spec in specs] == [("l0/f1",), ("l1/f2",), ("l2/f0",)]


def test_the_newest_artifact_wins_when_answers_arrive_out_of_order(
    registry: Registry, proxy: GatedProxy, tmp_path: Path
) -> None:
    repository = f"overlap/newest{secrets.token_hex(4)}"
    image = push_image(registry.host, repository, tmp_path, layers=2)
    bottom, top = (layer.digest for layer in image.layers)
    direct = client_for(registry.host)
    # Listed first: both layers' indexes and the profile created last.
    first = push_artifact(
        direct,
        image,
        span_size=64 << 10,
        profile=encoded_profile(image, ["l1/f0", "l0/f2"]),
        created="2026-03-01T00:00:00.000000Z",
    )
    # Listed second: a re-indexed bottom layer (other span size) and an older profile.
    second = push_artifact(
        direct,
        image,
        span_size=128 << 10,
        layer_digests=[bottom],
        profile=encoded_profile(image, ["l0/f0"]),
        created="2026-02-01T00:00:00.000000Z",
    )
    assert first.index_bytes[bottom] != second.index_bytes[bottom]
    # The first-listed artifact's manifest is answered only after the second's.
    proxy.hold(manifest_get(first.digest), after=manifest_get(second.digest))

    through_proxy = f"{proxy.host}/{repository}:v1"
    found = discovery_via(proxy.host)
    bottom_spec = found(labels(through_proxy, bottom))
    top_spec = found(labels(through_proxy, top))

    answered = proxy.finished_paths()
    assert answered.index(f"/v2/{repository}/manifests/{second.digest}") < answered.index(
        f"/v2/{repository}/manifests/{first.digest}"
    )
    # The last listed artifact naming a layer wins for that layer's index...
    assert bottom_spec.index_bytes == second.index_bytes[bottom]
    assert top_spec.index_bytes == first.index_bytes[top]
    # ...and the profile with the latest creation time, wherever it is listed.
    assert bottom_spec.prefetch_names == ("l0/f2",)
    assert top_spec.prefetch_names == ("l1/f0",)
