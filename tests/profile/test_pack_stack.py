"""The start-up pack against docker-registry and real FUSE mounts: `index build --profile`
pushes a pack with the profile; a mount fetches its layer's section in one request and serves
the profiled reads from it (no span request for those files); a pack that fails verification
(bytes corrupted in the registry's storage, a chunk digest that does not match) is logged with
the layer and the pack named, and the mount serves the same bytes from spans."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import directory, file, layer_tar, push, symlink, write_oci_layout
from harness.registry import Registry
from harness.trust import session_trust_policy
from snapshotter import sidecars
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.mount_spec import PACK_READ_AHEAD_KB, READ_AHEAD_KB
from snapshotter.index.pack import LayerPack, PackSection
from snapshotter.indexer import command
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.profile.attach import newest_index_artifact
from snapshotter.profile.model import StartupProfile, decode_profile
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Reference
from snapshotter.source.discover import IndexDiscovery
from snapshotter.source.labels import LayerRequest
from snapshotter.trust.policy import TrustPolicy
from snapshotter.vocabulary.artifact import PACK_MEDIA_TYPE, PROFILE_MEDIA_TYPE
from tests.profile.profile_helpers import wait_for_prefetch

pytestmark = pytest.mark.stack
BUSYBOX = Path("/bin/busybox")
COMMAND = "/bin/sh -c 'cat /data/b /data/a > /dev/null; head -c 100000 /data/big > /dev/null'"


@dataclasses.dataclass(frozen=True)
class PackedImage:
    ref: Reference
    manifest_digest: str
    base: str  # layer digests
    top: str
    files: dict[str, bytes]
    profile: StartupProfile
    pack_digest: str


def _build(registry: Registry, work: Path, *extra: str) -> PackedImage:
    if not BUSYBOX.exists() or os.geteuid() != 0:
        pytest.skip("needs root and busybox-static")
    files = {
        "data/a": os.urandom(300_000),
        "data/big": os.urandom(3 << 20),
        "data/b": os.urandom(200_000),
    }
    base = layer_tar(
        [
            directory("bin"),
            file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            *(symlink(f"bin/{tool}", "busybox") for tool in ("sh", "cat", "head")),
            directory("data"),
            file("data/a", files["data/a"]),
            file("data/big", files["data/big"]),
        ]
    )
    top = layer_tar([file("data/b", files["data/b"])])
    built = write_oci_layout(work / "layout", "v1", [base, top])
    repo = f"pack/app{secrets.token_hex(4)}"
    push(built, registry.host, repo, "v1")
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    args = ["build", str(ref), "--plain-http", "--min-layer-size", "64k", "--span-size", "64k"]
    code = command.run(parser.parse_args([*args, "--profile", COMMAND, *extra]))
    assert code == 0
    client = _client(registry)
    found = newest_index_artifact(client, ref, built.manifest_digest)
    assert found is not None
    artifact, _ = found
    [profile_blob] = [d for d in artifact.layers if d.media_type == PROFILE_MEDIA_TYPE]
    packs = [d.digest for d in artifact.layers if d.media_type == PACK_MEDIA_TYPE]
    profile = decode_profile(client.get_blob(ref.repository, profile_blob.digest))
    return PackedImage(
        ref,
        built.manifest_digest,
        built.layers[0].digest,
        built.layers[1].digest,
        files,
        profile,
        packs[0] if packs else "",
    )


def _client(registry: Registry) -> RegistryClient:
    return RegistryClient(HostsConfig(plain_http=[registry.host]), CredentialStore.anonymous())


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PackedImage:
    return _build(registry, tmp_path_factory.mktemp("packed"))


def _spec(
    registry: Registry, image: PackedImage, layer: str, trust: TrustPolicy | None = None
) -> LayerSpec:
    discovery = IndexDiscovery(
        _client(registry),
        RegistryAccess(plain_http=(registry.host,)),
        trust=trust or session_trust_policy(),
    )
    return discovery.resolve(
        LayerRequest("chain", str(image.ref), image.manifest_digest, layer, (image.base,))
    )


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[tuple[LazyLayers, list[Path]]]:
    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=10,
            background=BackgroundSettings(enabled=False),
        )
    )
    mounted: list[Path] = []
    yield lazy, mounted
    for mnt in mounted:
        lazy.unmount(str(mnt))


def _mount(mounter: tuple[LazyLayers, list[Path]], where: Path, spec: LayerSpec) -> Path:
    lazy, mounted = mounter
    where.mkdir()
    lazy.mount_layer(str(where), spec)
    mounted.append(where)
    return where


def _pack_state(mnt: Path, timeout: float = 20.0) -> str:
    """The mount's pack state once it settled (ready or failed)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = str((sidecars.read_state(str(mnt)) or {}).get("pack", ""))
        if state in ("ready", "failed"):
            return state
        time.sleep(0.05)
    return state


def _read_ahead_kb(mnt: Path) -> int:
    device = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    return int(bdi.read_text())


def _counters(mnt: Path) -> dict[str, int]:
    counters = (sidecars.read_state(str(mnt)) or {}).get("counters", {})
    assert isinstance(counters, dict)
    return counters


def test_a_profiled_read_is_served_from_the_pack_without_span_requests(
    image: PackedImage, registry: Registry, tmp_path: Path, mounter: tuple[LazyLayers, list[Path]]
) -> None:
    assert image.pack_digest and image.profile.pack is not None
    assert image.profile.pack.digest == image.pack_digest
    assert set(image.profile.pack.sections) == {image.base, image.top}
    spec = _spec(registry, image, image.base)
    assert spec.pack == image.profile.pack_for(image.base)

    since = registry.log_offset()
    mnt = _mount(mounter, tmp_path / "mnt", spec)
    assert _pack_state(mnt) == "ready"
    fetched = registry.blob_fetches(since)
    assert fetched[image.pack_digest].requests == 1  # the section, in one Range request
    assert fetched[image.pack_digest].bytes == spec.pack.section.length  # type: ignore[union-attr]
    assert image.base not in fetched  # no span prefetched for the profile's files
    state = sidecars.read_mount_state(str(mnt))  # what `lazysnap status` shows
    assert state is not None and state.pack == "ready"
    # the read-ahead the pack was recorded with, while it serves
    assert _read_ahead_kb(mnt) == PACK_READ_AHEAD_KB

    since = registry.log_offset()
    assert (mnt / "data/a").read_bytes() == image.files["data/a"]
    assert image.base not in registry.blob_fetches(since)
    counters = _counters_after_state_write(mnt)
    assert counters["pack_reads"] > 0 and counters["prefetch_spans"] == 0
    assert counters["pack_bytes"] == spec.pack.section.length  # type: ignore[union-attr]
    # A file the workload read only the start of: the rest comes from spans, on demand.
    assert (mnt / "data/big").read_bytes() == image.files["data/big"]
    assert registry.blob_fetches(since)[image.base].requests > 0


def _counters_after_state_write(mnt: Path) -> dict[str, int]:
    """The counters once the state file shows the pack's reads (written every 2 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _counters(mnt).get("pack_reads", 0) == 0:
        time.sleep(0.1)
    return _counters(mnt)


def test_a_chunk_whose_digest_does_not_match_falls_back_to_spans(
    image: PackedImage, registry: Registry, tmp_path: Path, mounter: tuple[LazyLayers, list[Path]]
) -> None:
    spec = _spec(registry, image, image.top)
    assert spec.pack is not None
    first, *rest = spec.pack.section.chunks
    wrong = dataclasses.replace(first, sha256="0" * 64)
    section = PackSection(spec.pack.section.offset, (wrong, *rest))
    spec = dataclasses.replace(spec, pack=LayerPack(spec.pack.pack_digest, spec.pack.pack_size,
                                                    section))  # fmt: skip
    mnt = _mount(mounter, tmp_path / "mnt", spec)
    assert _pack_state(mnt) == "failed"
    log = sidecars.log_path(str(mnt)).read_text()
    assert f"start-up pack {image.pack_digest} of layer {image.top}" in log
    assert "chunk 0: sha256" in log and "not the profile's 0000" in log
    assert (mnt / "data/b").read_bytes() == image.files["data/b"]
    assert _counters(mnt)["pack_reads"] == 0
    # without a pack: the full read-ahead once the layer's start is over (its reads quiet for
    # background_quiet_seconds: background fetch is off here)
    deadline = time.monotonic() + BackgroundSettings().quiet_seconds + 10
    while time.monotonic() < deadline and _read_ahead_kb(mnt) != READ_AHEAD_KB:
        time.sleep(0.1)
    assert _read_ahead_kb(mnt) == READ_AHEAD_KB


def test_a_pack_corrupted_in_the_registry_falls_back_to_spans_and_the_profile_prefetch(
    registry: Registry, tmp_path: Path, mounter: tuple[LazyLayers, list[Path]]
) -> None:
    image = _build(registry, tmp_path)
    stored = registry.blob_path(image.pack_digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside one chunk of some layer's section
    stored.write_bytes(bytes(data))
    states = {}
    for layer, name in ((image.base, "data/a"), (image.top, "data/b")):
        spec = _spec(registry, image, layer)
        assert spec.pack is not None
        mnt = _mount(mounter, tmp_path / f"mnt-{name[-1]}", spec)
        states[layer] = (_pack_state(mnt), mnt)
        assert (mnt / name).read_bytes() == image.files[name]
    # the flipped byte is in exactly one section: that layer's pack failed, logged, and the
    # mount fell back to the profile's prefetch (spans of its files)
    [(layer, mnt)] = [(layer, mnt) for layer, (state, mnt) in states.items() if state == "failed"]
    assert sorted(state for state, _ in states.values()) == ["failed", "ready"]
    log = sidecars.log_path(str(mnt)).read_text()
    assert f"start-up pack {image.pack_digest} of layer {layer} not used" in log
    assert wait_for_prefetch(mnt) > 0


def test_no_pack_builds_the_profile_alone(
    registry: Registry,
    tmp_path: Path,
    mounter: tuple[LazyLayers, list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = _build(registry, tmp_path, "--no-pack")
    assert image.pack_digest == "" and image.profile.pack is None
    assert _spec(registry, image, image.base).pack is None
    [platform] = json.loads(_show(image, capsys, "--json"))["platforms"]
    assert platform["profile"]["command"] == COMMAND and platform["profile"]["pack"] is None
    assert "  no start-up pack (built with --no-pack" in _show(image, capsys)


def _show(image: PackedImage, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """What `lazysnap index show IMAGE` prints."""
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    capsys.readouterr()
    code = command.run(parser.parse_args(["show", str(image.ref), "--plain-http", *extra]))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_index_show_lists_the_start_up_pack_and_its_layer_sections(
    image: PackedImage, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    pack_size = registry.blob_path(image.pack_digest).stat().st_size
    [platform] = json.loads(_show(image, capsys, "--json"))["platforms"]
    profile = platform["profile"]
    assert profile["command"] == COMMAND and profile["files"] == len(image.profile.entries)
    pack = profile["pack"]
    assert (pack["digest"], pack["size"]) == (image.pack_digest, pack_size)
    assert "error" not in pack
    sections = {section["layer"]: section for section in pack["sections"]}
    assert set(sections) == {image.base, image.top}
    # the sections tile the pack blob, in offset order
    assert [s["offset"] for s in pack["sections"]] == [0, pack["sections"][0]["size"]]
    assert sum(s["size"] for s in pack["sections"]) == pack_size
    # the workload read all of data/b (the top layer's one file), more than that of the base
    assert sections[image.top]["uncompressedSize"] >= len(image.files["data/b"])
    assert sections[image.base]["uncompressedSize"] >= len(image.files["data/a"]) + 100_000
    assert all(s["chunks"] >= 1 for s in pack["sections"])

    lines = _show(image, capsys).splitlines()
    assert f"  start-up pack {image.pack_digest} ({pack_size} bytes), 2 layer sections" in lines
    for layer, section in sections.items():
        [row] = [line.split() for line in lines if line.startswith(f"    {layer}")]
        assert row[1:] == [
            str(section[key]) for key in ("offset", "size", "uncompressedSize", "chunks")
        ]


def test_a_pack_too_big_for_the_cache_is_not_used_and_the_mount_serves_from_spans(
    image: PackedImage, registry: Registry, tmp_path: Path
) -> None:
    spec = _spec(registry, image, image.top)
    assert spec.pack is not None and spec.pack.section.uncompressed_size > 100_000
    lazy = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            100_000,  # the cache's bound: less than the section's bytes
            fetch_timeout=10,
            background=BackgroundSettings(enabled=False),
        )
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazy.mount_layer(str(mnt), spec)
    try:
        assert _pack_state(mnt) == "failed"
        log = sidecars.log_path(str(mnt)).read_text()
        assert f"start-up pack {image.pack_digest} of layer {image.top} not used: no room" in log
        assert (mnt / "data/b").read_bytes() == image.files["data/b"]
    finally:
        lazy.unmount(str(mnt))


def test_the_pack_of_an_unsigned_artifact_is_not_used_where_signatures_are_required(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers' indexes are signed, the profile (with its pack) is pushed in a newer artifact
    without a signature: a node that requires signatures takes the indexes of the signed
    artifact and neither the profile nor the pack of the unsigned one."""
    image = _build(registry, tmp_path / "signed", "--no-pack")  # signed indexes, no pack
    trust = session_trust_policy()  # signatures required, by the session's key
    monkeypatch.delenv(command.SIGN_KEY_ENV)
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    args = ["build", str(image.ref), "--plain-http", "--min-layer-size", "64k"]
    assert command.run(parser.parse_args([*args, "--span-size", "64k", "--profile", COMMAND])) == 0
    found = newest_index_artifact(_client(registry), image.ref, image.manifest_digest)
    assert found is not None
    assert any(d.media_type == PACK_MEDIA_TYPE for d in found[0].layers)  # the newest has one
    spec = _spec(registry, image, image.base, trust)
    assert spec.pack is None and spec.prefetch_names == image.profile.names_for(image.base)
