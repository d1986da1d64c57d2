"""The snapshot core with the real lazy-layer manager in the background mode the daemon uses:
Prepare answers before the mount is ready, and whatever stacks on the layer waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from snapshotter.core.errors import AlreadyExists, FailedPrecondition, NotFound
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import read_state
from tests.fs.fs_helpers import built_index, compress, make_tar, rich_members
from tests.fs.test_fs_mount import Layer, wait_for_deaths

pytestmark = pytest.mark.stack
TARGET = "ns/1/sha256:" + "cd" * 32


class Resolver:
    """Discovery's stand-in: the layer's spec, or a failure while the "registry" is down."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.down = False
        self.calls = 0

    def __call__(self, labels: Mapping[str, str]) -> LayerSpec:
        self.calls += 1
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.spec


@pytest.fixture
def layer() -> Iterator[Layer]:
    tar = make_tar(rich_members())
    blob = compress(tar, "gzip")
    instance = Layer(tar, blob, built_index(blob, "gzip"))
    yield instance
    instance.server.stop()


@pytest.fixture
def stack(layer: Layer, tmp_path: Path) -> Iterator[tuple[Snapshotter, Resolver]]:
    resolver = Resolver(layer.spec())
    layers = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, mount_in_background=True),
        resolve=resolver,
    )
    core = Snapshotter(str(tmp_path / "root"), remote=layers)
    yield core, resolver
    for state in (tmp_path / "root").glob("snapshots/*/fs.lazysnap.json"):
        layers.unmount(str(state).removesuffix(".lazysnap.json"))
    core.close()


def labels() -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": TARGET,
        "containerd.io/snapshot/cri.layer-digest": "sha256:" + "ab" * 32,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/test/app:1",
    }


def container_reads(core: Snapshotter, key: str, tmp_path: Path, name: str) -> bytes:
    """Mount the container's rootfs as containerd would and read name from it."""
    [mount] = core.mounts(key)
    rootfs = tmp_path / f"rootfs-{key}"
    rootfs.mkdir()
    options = ",".join(mount.options)
    subprocess.run(["mount", "-t", mount.type, "-o", options, "overlay", str(rootfs)], check=True)
    try:
        return (rootfs / name).read_bytes()
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


def lazy_mountpoint(core: Snapshotter, tmp_path: Path) -> Path:
    with pytest.raises(AlreadyExists):
        core.prepare("extract-1", "", labels())
    [mountpoint] = (tmp_path / "root").glob("snapshots/*/fs")
    return mountpoint


def test_a_container_on_a_layer_still_mounting_sees_its_files(
    stack: tuple[Snapshotter, Resolver], layer: Layer, tmp_path: Path
) -> None:
    core, _ = stack
    lazy_mountpoint(core, tmp_path)  # answered at once: the mount process is still starting
    core.prepare("container", TARGET)
    assert container_reads(core, "container", tmp_path, "etc/hosts") == layer.data("etc/hosts")


def test_a_dead_mount_process_is_replaced_when_a_container_uses_the_layer(
    stack: tuple[Snapshotter, Resolver], layer: Layer, tmp_path: Path
) -> None:
    core, resolver = stack
    mountpoint = lazy_mountpoint(core, tmp_path)
    core.prepare("container", TARGET)
    first = read_state(str(mountpoint))
    assert first is not None
    # The daemon restarts a dead mount process once at once; dying again soon after, it is left
    # for the next use of the layer. Its mount now answers ENOTCONN.
    os.kill(first["pid"], signal.SIGKILL)
    wait_for_deaths(mountpoint, 1)
    core.mounts("container")  # waits for the restarted process
    state = read_state(str(mountpoint))
    assert state is not None and state["pid"] != first["pid"]
    os.kill(state["pid"], signal.SIGKILL)
    wait_for_deaths(mountpoint, 2)

    # Without the registry the layer cannot come back: the user is told which layer it is.
    resolver.down = True
    with pytest.raises(FailedPrecondition, match=r"sha256:abab.*registry unreachable"):
        core.mounts("container")
    with pytest.raises(FailedPrecondition, match="cannot be mounted"):
        core.prepare("container-2", TARGET)
    with pytest.raises(NotFound):
        core.stat("container-2")

    # Once it is back, the next use mounts the layer again, without restarting anything.
    resolver.down = False
    assert container_reads(core, "container", tmp_path, "etc/hosts") == layer.data("etc/hosts")
    new_state = read_state(str(mountpoint))
    assert new_state is not None and new_state["pid"] != state["pid"]
