"""Registry-wide reuse of layer indexes against real docker-registry 2.8: an image in another
namespace reads not one byte of a base layer some image of the registry indexed before; a
cache repository the builder may not push to is skipped (logged), not fatal."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, random_layer, unique

from harness.images import BuiltImage
from harness.procs import HarnessError
from harness.registry import Registry, TokenAuth, start_registry
from harness.token_issuer import TokenIssuer
from snapshotter.indexer.layer_cache import CACHE_REPO_NAME, cache_tag
from snapshotter.remote.credentials import Credentials
from snapshotter.remote.reference import Reference

pytestmark = pytest.mark.stack

Index = Callable[..., CliResult]
LAYER = 400 << 10
FLAGS = ("--plain-http", "--min-layer-size", str(64 << 10), "--span-size", "65536")
USER, PASSWORD = "builder", "builder-Secret-7"


def _two_namespaces(
    target: Target, workdir: Path, *namespaces: str
) -> tuple[list[str], list[BuiltImage]]:
    """One image per namespace (`<ns>/app:v1`), all on the same base layer."""
    base = random_layer("base", LAYER)
    refs, images = [], []
    with target.client() as client:
        for namespace in namespaces:
            image = build_image(workdir, namespace, [base, random_layer(namespace, LAYER)])
            push_image(client, image, target.host, f"{namespace}/app", "v1")
            refs.append(f"{target.host}/{namespace}/app:v1")
            images.append(image)
    return refs, images


def _read(registry: Registry, offset: int, digest: str) -> int:
    fetched = registry.blob_fetches(since=offset).get(digest)
    return fetched.bytes if fetched else 0


def test_another_namespace_reuses_a_shared_layer_from_the_registry_wide_cache(
    lazysnap_index: Index,
    registry: Registry,
    docker_config: Callable[[Target], None],
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="snapshotter.indexer")
    target = Target(registry.host, unique("team"), None)
    docker_config(target)
    team, other, private = unique("team"), unique("other"), unique("private")
    refs, images = _two_namespaces(target, workdir, team, other, private)
    assert lazysnap_index("build", refs[0], *FLAGS).code == 0
    shared = images[1].layers[0]

    offset = registry.log_offset()
    result = lazysnap_index("build", refs[1], *FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 1 reused" in result.out
    assert f"{images[1].layers[1].size} bytes read" in result.out  # only its own layer
    assert _read(registry, offset, shared.digest) == 0
    assert f"reusing its index from cache {registry.host}/{CACHE_REPO_NAME}" in caplog.text
    own_cache = f"{registry.host}/{other}/{CACHE_REPO_NAME}"
    assert (
        f"index cache: 1 reused from {registry.host}/{CACHE_REPO_NAME}, 1 stored in {own_cache}, "
        f"1 stored in {registry.host}/{CACHE_REPO_NAME}\n"
    ) in result.out

    # Opting out of the registry-wide cache: the layer is read again.
    offset = registry.log_offset()
    result = lazysnap_index("build", refs[2], *FLAGS, "--no-shared-cache")
    assert result.code == 0, result.err
    assert "2 layers indexed, 0 reused" in result.out
    assert _read(registry, offset, shared.digest) == shared.size


@pytest.fixture(scope="module")
def token_stack() -> Iterator[tuple[TokenIssuer, Registry]]:
    """docker-registry behind bearer tokens from an issuer that can make repositories
    read-only (tokens for them grant pull, never push: the registry answers 401)."""
    base = Path(tempfile.mkdtemp(prefix="lzs-shared-cache-", dir="/tmp"))
    issuer = TokenIssuer(base / "issuer", users={USER: PASSWORD}).start()
    auth = TokenAuth(issuer.realm, issuer.service, issuer.issuer, issuer.cert_path)
    try:
        registry = start_registry(base / "registry", token_auth=auth)
    except HarnessError as exc:
        issuer.stop()
        pytest.fail(str(exc), pytrace=False)
    yield issuer, registry
    registry.stop()
    issuer.stop()
    shutil.rmtree(base, ignore_errors=True)  # every run would leave one in /tmp


def test_a_cache_the_builder_may_not_push_to_is_skipped_for_the_next(
    lazysnap_index: Index,
    token_stack: tuple[TokenIssuer, Registry],
    docker_config: Callable[[Target], None],
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="snapshotter.indexer")
    issuer, registry = token_stack
    team, other = unique("team"), unique("other")
    target = Target(registry.host, team, Credentials(USER, PASSWORD))
    docker_config(target)
    own_cache = f"{team}/{CACHE_REPO_NAME}"
    issuer.read_only.add(own_cache)
    refs, images = _two_namespaces(target, workdir, team, other)

    result = lazysnap_index("build", refs[0], *FLAGS)
    assert result.code == 0, result.err
    assert "2 layers indexed" in result.out
    assert f"index cache: 2 stored in {registry.host}/{CACHE_REPO_NAME}\n" in result.out
    assert f"not storing its index in cache {registry.host}/{own_cache} (no push permission" in (
        caplog.text
    )
    assert f"in cache {registry.host}/{CACHE_REPO_NAME} (manifest entry)" in caplog.text
    # Summed up once per image, as a warning (what `index build` and `accel serve` show).
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"layer index cache {registry.host}/{own_cache} did not take 2 ")
    assert warning.endswith(f"stored in: {registry.host}/{CACHE_REPO_NAME}")
    shared = images[1].layers[0]
    with target.client() as client:
        tag = cache_tag(shared.digest)
        client.get_manifest(Reference(registry.host, CACHE_REPO_NAME, tag=tag))

    offset = registry.log_offset()
    result = lazysnap_index("build", refs[1], *FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 1 reused" in result.out
    assert _read(registry, offset, shared.digest) == 0
