"""`lazysnap index build|show` against real registries: docker-registry 2.8 (no referrers API:
tag fallback) and peryx (native OCI 1.1 referrers API)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from indexer_helpers import (
    CliResult,
    Target,
    build_image,
    push_image,
    push_index,
    random_layer,
    unique,
    writes_since,
)

from harness.images import BuiltImage, file, layer_tar
from harness.peryx import Peryx
from harness.registry import Registry
from harness.registry_calls import delete_manifest
from snapshotter.indexer.layer_cache import cache_tag
from snapshotter.remote.credentials import Credentials
from snapshotter.remote.errors import ManifestNotFound
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import fallback_tag
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, WINDOWS_BLOB_MEDIA_TYPE

pytestmark = pytest.mark.stack

Index = Callable[..., CliResult]
SMALL = 64 << 10  # --min-layer-size in these tests: our tiny layer stays below it
LAYER = 400 << 10  # incompressible bytes per big layer (gzip ~ the same size)
BUILD_FLAGS = ("--plain-http", "--min-layer-size", str(SMALL), "--span-size", "65536")


@pytest.fixture
def native(peryx: Peryx, docker_config: Callable[[Target], None]) -> Target:
    target = Target(peryx.host, peryx.route, Credentials("lazysnap", peryx.token))
    docker_config(target)
    return target


def _show(index: Index, ref: str, *extra: str) -> dict[str, Any]:
    result = index("show", ref, "--plain-http", "--json", *extra)
    assert result.code == 0, result.err
    doc: dict[str, Any] = json.loads(result.out)
    return doc


def _small_layer() -> bytes:
    return layer_tar([file("etc/motd", "tiny\n")])


def _index_the_first_of_two_sharing_a_base(
    index: Index, target: Target, workdir: Path, first_repo: str, second_repo: str
) -> BuiltImage:
    """Push two images whose bottom layer is the same, index the first; returns the second."""
    base = random_layer("base", LAYER)
    first = build_image(workdir, "first", [base, random_layer("one", LAYER)])
    second = build_image(workdir, "second", [base, random_layer("two", LAYER)])
    with target.client() as client:
        push_image(client, first, target.host, first_repo, "v1")
        push_image(client, second, target.host, second_repo, "v1")
    assert index("build", f"{target.host}/{first_repo}:v1", *BUILD_FLAGS).code == 0
    return second


def _build_and_check(index: Index, target: Target, workdir: Path, source: str) -> None:
    base, app = random_layer("base", LAYER), random_layer("app", LAYER)
    image = build_image(workdir, "v1", [base, app, _small_layer()])
    repo = f"{target.namespace}/{unique('app')}"
    with target.client() as client:
        push_image(client, image, target.host, repo, "v1")
    ref = f"{target.host}/{repo}:v1"

    built = index("build", ref, *BUILD_FLAGS)
    assert built.code == 0, built.err
    assert "2 layers indexed, 0 reused" in built.out
    assert "1 skipped" in built.out

    shown = _show(index, ref)
    [platform] = shown["platforms"]
    assert platform["manifest"] == image.manifest_digest
    assert platform["artifact"]["artifactType"] == ARTIFACT_TYPE
    assert platform["artifact"]["source"] == source
    layers = platform["layers"]
    assert [layer["digest"] for layer in layers] == [layer.digest for layer in image.layers]
    assert [layer["indexed"] for layer in layers] == [True, True, False]
    for layer in layers[:2]:
        # 5 tar entries (README + 4 files, parent dir implied); ~400 KiB in 64 KiB spans.
        assert layer["index"]["entries"] >= 5
        assert layer["index"]["spans"] >= 4
        assert layer["index"]["size"] > 0

    with target.client() as client:
        artifact = client.get_manifest(
            Reference(target.host, repo, digest=platform["artifact"]["digest"])
        )
        doc = artifact.json()
        assert doc["subject"]["digest"] == image.manifest_digest
        assert "annotations" not in doc
        # The per-layer cache entry other images will reuse.
        cache = Repository(target.host, f"{target.namespace}/lazysnap-index-cache")
        cached = client.get_manifest(
            Reference(cache.registry, cache.name, tag=cache_tag(image.layers[0].digest))
        )
        assert cached.layers[0].digest == doc["layers"][0]["digest"]


def test_build_and_show_with_tag_fallback(
    lazysnap_index: Index, dist: Target, workdir: Path
) -> None:
    _build_and_check(lazysnap_index, dist, workdir, "tag-fallback")


def test_build_and_show_with_referrers_api(
    lazysnap_index: Index, native: Target, workdir: Path
) -> None:
    _build_and_check(lazysnap_index, native, workdir, "referrers-api")


def test_shared_base_layer_is_reused_without_reading_it(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    first_repo, second_repo = f"{dist.namespace}/first", f"{dist.namespace}/second"
    second = _index_the_first_of_two_sharing_a_base(
        lazysnap_index, dist, workdir, first_repo, second_repo
    )

    offset = registry.log_offset()
    result = lazysnap_index("build", f"{dist.host}/{second_repo}:v1", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 1 reused" in result.out
    fetched = registry.blob_fetches(since=offset)
    shared, own = second.layers[0].digest, second.layers[1].digest
    assert shared not in fetched  # not one byte of the shared base layer
    assert fetched[own].bytes == second.layers[1].size

    shown = _show(lazysnap_index, f"{dist.host}/{second_repo}:v1")
    assert [layer["indexed"] for layer in shown["platforms"][0]["layers"]] == [True, True]


def test_rebuild_of_an_indexed_image_pushes_nothing(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    image = build_image(workdir, "v1", [random_layer("a", LAYER)])
    repo = f"{dist.namespace}/app"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
    ref = f"{dist.host}/{repo}:v1"
    first = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert first.code == 0, first.err

    offset = registry.log_offset()
    again = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert again.code == 0, again.err
    assert "already indexed" in again.out
    registry.blob_fetches(since=offset)  # waits for the access log to settle
    assert writes_since(registry.log_path, offset) == []
    assert image.layers[0].digest not in registry.blob_fetches(since=offset)


def _two_platform_image(dist: Target, workdir: Path, repo: str) -> tuple[Any, Any, str]:
    amd = build_image(workdir, "amd", [random_layer("amd", LAYER)])
    arm = build_image(workdir, "arm", [random_layer("arm", LAYER)])
    with dist.client() as client:
        amd_desc = push_image(client, amd, dist.host, repo, "amd")
        arm_desc = push_image(client, arm, dist.host, repo, "arm")
        push_index(
            client, dist.host, repo, "multi", [(amd_desc, "linux/amd64"), (arm_desc, "linux/arm64")]
        )
    return amd, arm, f"{dist.host}/{repo}:multi"


def test_multi_platform_index_builds_only_the_asked_platform(
    lazysnap_index: Index, dist: Target, workdir: Path
) -> None:
    _amd, _arm, ref = _two_platform_image(dist, workdir, f"{dist.namespace}/multi")
    result = lazysnap_index("build", ref, "--platform", "linux/arm64", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed" in result.out

    both = _show(lazysnap_index, ref, "--all-platforms")["platforms"]
    artifacts = {p["platform"]: p["artifact"] for p in both}
    assert artifacts["linux/amd64"] is None
    assert artifacts["linux/arm64/v8"]["source"] == "tag-fallback"

    result = lazysnap_index("build", ref, "--all-platforms", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 0 reused, 1 already indexed" in result.out
    assert all(p["artifact"] for p in _show(lazysnap_index, ref, "--all-platforms")["platforms"])


def test_sparse_index_requires_only_the_asked_platform(
    lazysnap_index: Index, dist: Target, workdir: Path
) -> None:
    repo = f"{dist.namespace}/sparse"
    _amd, arm, ref = _two_platform_image(dist, workdir, repo)
    with dist.client() as client:
        # The index still names the arm64 manifest, which is gone: a sparse index.
        delete_manifest(client, Repository(dist.host, repo), arm.manifest_digest)

    asked_absent = lazysnap_index("build", ref, "--platform", "linux/arm64", *BUILD_FLAGS)
    assert asked_absent.code == 1
    assert arm.manifest_digest in asked_absent.err and "absent" in asked_absent.err
    assert "Traceback" not in asked_absent.err

    result = lazysnap_index("build", ref, "--all-platforms", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed" in result.out

    result = lazysnap_index("build", ref, "--platform", "linux/amd64", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "already indexed" in result.out


def _blob_file(registry: Registry, digest: str) -> Path:
    hex_digest = digest.split(":", 1)[1]
    return (
        registry.base
        / "data"
        / "docker"
        / "registry"
        / "v2"
        / "blobs"
        / "sha256"
        / hex_digest[:2]
        / hex_digest
        / "data"
    )


def _assert_nothing_pushed(
    registry: Registry, offset: int, dist: Target, repo: str, image: Any
) -> None:
    registry.blob_fetches(since=offset)  # waits for the access log to settle
    assert writes_since(registry.log_path, offset) == []
    with dist.client() as client, pytest.raises(ManifestNotFound):
        client.get_manifest(Reference(dist.host, repo, tag=fallback_tag(image.manifest_digest)))


def test_layer_whose_bytes_do_not_match_its_digest_fails_and_pushes_nothing(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    image = build_image(workdir, "v1", [random_layer("good", LAYER), random_layer("bad", LAYER)])
    repo = f"{dist.namespace}/corrupt"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
    # Corrupt the stored blob behind the registry's back (same length, other bytes): the
    # registry serves it under the old digest, as a broken disk or a lying mirror would.
    bad = image.layers[1]
    stored = _blob_file(registry, bad.digest)
    stored.write_bytes(os.urandom(stored.stat().st_size))

    offset = registry.log_offset()
    result = lazysnap_index("build", f"{dist.host}/{repo}:v1", *BUILD_FLAGS, "--jobs", "1")
    assert result.code == 1
    assert bad.digest in result.err
    assert "Traceback" not in result.err
    _assert_nothing_pushed(registry, offset, dist, repo, image)


def test_hostile_layer_fails_the_image_and_pushes_nothing(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    # Valid gzip (the digest matches) around bytes that are not a tar.
    garbage = os.urandom(LAYER)
    image = build_image(workdir, "v1", [random_layer("good", LAYER), garbage])
    repo = f"{dist.namespace}/hostile"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
    offset = registry.log_offset()
    result = lazysnap_index("build", f"{dist.host}/{repo}:v1", *BUILD_FLAGS)
    assert result.code == 1
    assert image.layers[1].digest in result.err
    _assert_nothing_pushed(registry, offset, dist, repo, image)


def test_mistagged_cache_entry_is_not_trusted(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    first = build_image(workdir, "first", [random_layer("x", LAYER)])
    victim = build_image(workdir, "victim", [random_layer("y", LAYER)])
    with dist.client() as client:
        push_image(client, first, dist.host, f"{dist.namespace}/first", "v1")
        push_image(client, victim, dist.host, f"{dist.namespace}/victim", "v1")
    assert lazysnap_index("build", f"{dist.host}/{dist.namespace}/first:v1", *BUILD_FLAGS).code == 0
    # Copy the first layer's cache manifest under the victim layer's tag.
    cache = Repository(dist.host, f"{dist.namespace}/lazysnap-index-cache")
    with dist.client() as client:
        entry = client.get_manifest(
            Reference(cache.registry, cache.name, tag=cache_tag(first.layers[0].digest))
        )
        client.push_manifest(
            cache, cache_tag(victim.layers[0].digest), entry.data, entry.media_type
        )

    offset = registry.log_offset()
    result = lazysnap_index("build", f"{dist.host}/{dist.namespace}/victim:v1", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 0 reused" in result.out
    assert registry.blob_fetches(since=offset)[victim.layers[0].digest].bytes > 0


def test_bad_arguments_are_clear_errors(lazysnap_index: Index, dist: Target) -> None:
    result = lazysnap_index("build", "Not A Ref", "--plain-http")
    assert result.code == 2 and "Not A Ref" in result.err
    result = lazysnap_index("build", f"{dist.host}/x/y:1", "--platform", "linux", "--plain-http")
    assert result.code == 2 and "'linux'" in result.err
    result = lazysnap_index("show", f"{dist.host}/{dist.namespace}/missing:1", "--plain-http")
    assert result.code == 1 and "missing" in result.err and "Traceback" not in result.err


def test_shared_base_layer_is_reused_on_a_registry_with_referrers_api(
    lazysnap_index: Index, native: Target, workdir: Path
) -> None:
    first_repo = f"{native.namespace}/{unique('first')}"
    second_repo = f"{native.namespace}/{unique('second')}"
    _index_the_first_of_two_sharing_a_base(lazysnap_index, native, workdir, first_repo, second_repo)
    result = lazysnap_index("build", f"{native.host}/{second_repo}:v1", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 1 reused" in result.out
    # The reused index blob is now in the second repository, readable by the snapshotter.
    [platform] = _show(lazysnap_index, f"{native.host}/{second_repo}:v1")["platforms"]
    assert platform["artifact"]["source"] == "referrers-api"
    assert all(layer["index"]["entries"] >= 5 for layer in platform["layers"])


def test_cache_entry_whose_windows_blob_is_gone_is_indexed_again(
    lazysnap_index: Index,
    dist: Target,
    registry: Registry,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A cache entry is reused without reading the layer, but only if its blobs are still
    # there: adopting a missing windows blob would fail the whole build.
    first_repo, second_repo = f"{dist.namespace}/first", f"{dist.namespace}/second"
    second = _index_the_first_of_two_sharing_a_base(
        lazysnap_index, dist, workdir, first_repo, second_repo
    )
    shared = second.layers[0]
    cache = Repository(dist.host, f"{dist.namespace}/lazysnap-index-cache")
    with dist.client() as client:
        entry = client.get_manifest(
            Reference(cache.registry, cache.name, tag=cache_tag(shared.digest))
        )
        [windows] = [d for d in entry.layers if d.media_type == WINDOWS_BLOB_MEDIA_TYPE]
        # The cache repository lost it (deleted through the registry API).
        response, _ = client.request(
            "DELETE",
            cache,
            f"/{cache.name}/blobs/{windows.digest}",
            capability="push",
            actions=("pull", "push", "delete"),
        )
        response.close()
        assert response.status_code == 202, response.status_code
        assert not client.blob_exists(cache, windows.digest)

    offset = registry.log_offset()
    # Not the registry-wide cache: it holds an intact copy of the entry (the first build stored
    # it there too), which the build would rightly reuse.
    second_ref = f"{dist.host}/{second_repo}:v1"
    result = lazysnap_index("build", second_ref, *BUILD_FLAGS, "--no-shared-cache")
    assert result.code == 0, result.err
    assert "2 layers indexed, 0 reused" in result.out
    assert f"its windows blob {windows.digest} is missing" in caplog.text
    assert registry.blob_fetches(since=offset)[shared.digest].bytes == shared.size
    shown = _show(lazysnap_index, f"{dist.host}/{second_repo}:v1")
    assert [layer["indexed"] for layer in shown["platforms"][0]["layers"]] == [True, True]
