"""`lazysnap index build` without `--profile` against docker-registry: the artifact it pushes
carries a static start-up profile (the entrypoint, its ELF loader and libraries, the /etc files
libc reads), discovery hands it to the layers' mounts, which fetch those files before anything
reads them; `--no-static-profile` leaves it out, and a recorded profile wins over it."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

import pytest

from harness.images import directory, file, layer_tar, push, symlink, whiteout, write_oci_layout
from harness.registry import Registry
from harness.trust import session_trust_policy
from snapshotter.indexer import command
from snapshotter.indexer.static_profile import STATIC_COMMAND_PREFIX, STATIC_PROFILE_CREATED
from snapshotter.profile.attach import newest_index_artifact
from snapshotter.profile.model import StartupProfile, decode_profile
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Reference
from snapshotter.source.discover import IndexDiscovery
from snapshotter.source.labels import LayerRequest
from snapshotter.vocabulary.artifact import PROFILE_CREATED_ANNOTATION, PROFILE_MEDIA_TYPE
from tests.profile.profile_helpers import mounted_without_background, wait_for_prefetch

pytestmark = pytest.mark.stack
LIBDIR = "usr/lib/x86_64-linux-gnu"
LOADER = f"{LIBDIR}/ld-linux-x86-64.so.2"
LIBC = f"{LIBDIR}/libc.so.6"


def _index(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    capsys.readouterr()
    code = command.run(parser.parse_args(list(args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image(registry: Registry, tmp_path: Path) -> tuple[str, str, list[str]]:
    """(repository prefix, manifest digest, layer digests bottom first) of an image running
    this machine's /bin/true as `app` through PATH: libc and its loader (reached through the
    merged-/usr symlinks) below, the program above, a small unindexed layer on top that whites
    out /etc/group."""
    base = layer_tar(
        [
            directory("usr"),
            directory("usr/lib"),
            directory(LIBDIR),
            file(LOADER, Path("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").read_bytes(), 0o755),
            file(LIBC, Path("/lib/x86_64-linux-gnu/libc.so.6").read_bytes(), 0o755),
            symlink("lib", "usr/lib"),
            directory("lib64"),
            symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            directory("etc"),
            file("etc/ld.so.cache", b"not a real cache"),
            file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            file("etc/group", b"root:x:0:\n"),
            file("usr/share/unread", os.urandom(300_000)),
        ]
    )
    program = layer_tar(
        [
            directory("usr/local/bin"),
            file("usr/local/bin/app", Path("/bin/true").read_bytes(), 0o755),
            file("usr/local/share/padding", os.urandom(200_000)),
        ]
    )
    top = layer_tar([whiteout("etc/group")])
    built = write_oci_layout(tmp_path / "layout", "v1", [base, program, top], cmd=["app"])
    prefix = f"static/app{secrets.token_hex(4)}"
    for name in ("a", "b", "c", "d"):
        push(built, registry.host, f"{prefix}-{name}", "v1")
    return prefix, built.manifest_digest, [layer.digest for layer in built.layers]


def _client(registry: Registry) -> RegistryClient:
    return RegistryClient(HostsConfig(plain_http=[registry.host]), CredentialStore.anonymous())


def _profiles(client: RegistryClient, ref: Reference, digest: str) -> list[StartupProfile]:
    found = newest_index_artifact(client, ref, digest)
    assert found is not None
    artifact, _ = found
    blobs = [d for d in artifact.layers if d.media_type == PROFILE_MEDIA_TYPE]
    for blob in blobs:
        assert blob.annotations[PROFILE_CREATED_ANNOTATION] == STATIC_PROFILE_CREATED
    return [decode_profile(client.get_blob(ref.repository, blob.digest)) for blob in blobs]


def test_index_build_attaches_a_static_profile_a_mount_prefetches(
    image: tuple[str, str, list[str]],
    registry: Registry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix, manifest_digest, (base, program, top) = image
    ref = Reference.parse(f"{registry.host}/{prefix}-a:v1")
    code, out, err = _index(
        "build", str(ref), "--plain-http", "--min-layer-size", "100k", capsys=capsys
    )
    assert code == 0, err
    assert "static profile sha256:" in out and "5 files for usr/local/bin/app" in out

    client = _client(registry)
    [profile] = _profiles(client, ref, manifest_digest)
    assert profile.command == f"{STATIC_COMMAND_PREFIX} app"
    # start order; etc/group is whited out by the top layer; the top layer is not indexed
    assert [(e.layer_digest, e.name) for e in profile.entries] == [
        (program, "usr/local/bin/app"),
        (base, LOADER),
        (base, "etc/ld.so.cache"),
        (base, LIBC),
        (base, "etc/passwd"),
    ]
    assert profile.names_for(top) == ()
    code, out, err = _index("show", str(ref), "--plain-http", "--json", capsys=capsys)
    assert code == 0, err
    [platform] = json.loads(out)["platforms"]
    shown = platform["profile"]
    assert (shown["command"], shown["files"], shown["pack"]) == (profile.command, 5, None)

    discovery = IndexDiscovery(
        client, RegistryAccess(plain_http=(registry.host,)), trust=session_trust_policy()
    )
    spec = discovery.resolve(LayerRequest("chain", str(ref), manifest_digest, base, (base,)))
    assert spec.prefetch_names == (LOADER, "etc/ld.so.cache", LIBC, "etc/passwd")

    with mounted_without_background(spec, tmp_path) as mnt:
        assert wait_for_prefetch(mnt) > 0  # before any read
        since = registry.log_offset()
        assert (mnt / LIBC).read_bytes() == Path("/lib/x86_64-linux-gnu/libc.so.6").read_bytes()
        registry.wait_log_quiet()
        assert base not in registry.blob_fetches(since)  # already local


def test_no_static_profile_flag_leaves_it_out(
    image: tuple[str, str, list[str]],
    registry: Registry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix, manifest_digest, _ = image
    ref = Reference.parse(f"{registry.host}/{prefix}-b:v1")
    code, out, err = _index(
        "build",
        str(ref),
        "--plain-http",
        "--min-layer-size",
        "100k",
        "--no-static-profile",
        capsys=capsys,
    )
    assert code == 0, err
    assert "static profile" not in out
    assert _profiles(_client(registry), ref, manifest_digest) == []
    code, out, err = _index("show", str(ref), "--plain-http", capsys=capsys)
    assert code == 0, err
    assert "  no start-up profile (no prefetch, no start-up pack)" in out.splitlines()


def test_a_recorded_profile_wins_over_the_static_one(
    image: tuple[str, str, list[str]],
    registry: Registry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix, manifest_digest, (base, _, _) = image
    # -d's build leaves both indexes in the namespace's layer cache: -c reuses them, so its
    # static profile reads the layers through indexes fetched back from the cache repository
    code, _, err = _index(
        "build",
        f"{registry.host}/{prefix}-d:v1",
        "--plain-http",
        "--min-layer-size",
        "100k",
        capsys=capsys,
    )
    assert code == 0, err
    ref = Reference.parse(f"{registry.host}/{prefix}-c:v1")
    code, out, err = _index(
        "build",
        str(ref),
        "--plain-http",
        "--min-layer-size",
        "100k",
        "--profile",
        "app",
        capsys=capsys,
    )
    assert code == 0, err
    assert "static profile sha256:" in out and "command exited 0" in out
    assert "0 layers indexed, 2 reused" in out and "5 files for usr/local/bin/app" in out
    client = _client(registry)
    discovery = IndexDiscovery(
        client, RegistryAccess(plain_http=(registry.host,)), trust=session_trust_policy()
    )
    spec = discovery.resolve(LayerRequest("chain", str(ref), manifest_digest, base, (base,)))
    # /bin/true never reads /etc/passwd: the profile handed to the mount is the recorded one
    assert LIBC in spec.prefetch_names and "etc/passwd" not in spec.prefetch_names
