"""Mount processes forked by the zygote (`[fuse] zygote`): the same mounts, recognised, stopped
and adopted as plainly started ones, and a zygote that dies or cannot start costs nothing but
its speed."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fs.zygote import FORKED_NAME, ForkedChild, Zygote
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.mount_checks import is_mount_process as _is_mount_process
from snapshotter.lazylayers.mount_checks import mount_problem
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import read_state
from tests.fs.fs_helpers import (
    assert_tree_matches,
    built_index,
    compress,
    expected_view,
    make_tar,
    rich_members,
)
from tests.fs.lazy_layers_helpers import is_live
from tests.fs.test_fs_mount import Layer

pytestmark = pytest.mark.stack
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layer() -> Iterator[Layer]:
    tar = make_tar(rich_members())
    blob = compress(tar, "gzip")
    instance = Layer(tar, blob, built_index(blob, "gzip"))
    yield instance
    instance.server.stop()


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[list[LazyLayers]]:
    """Every manager a test makes; their mounts are unmounted and zygotes stopped at the end."""
    made: list[LazyLayers] = []
    yield made
    for manager in made:
        for state in tmp_path.rglob("*.lazysnap.json"):
            manager.unmount(str(state).removesuffix(".lazysnap.json"))
        manager.close()


def zygote_manager(
    tmp_path: Path, made: list[LazyLayers], python: str = sys.executable
) -> LazyLayers:
    manager = LazyLayers(
        LazyLayerSettings(str(tmp_path / "cache"), 1 << 30, zygote=True, python=python)
    )
    made.append(manager)
    return manager


def mount(manager: LazyLayers, layer: Layer, where: Path) -> int:
    """Mount layer at where; the mount process's pid."""
    where.mkdir(parents=True, exist_ok=True)
    manager.mount_layer(str(where), layer.spec())
    state = read_state(str(where))
    assert state is not None
    return int(state["pid"])


def the_zygote(manager: LazyLayers) -> Zygote:
    zygote = manager.supervisor.starter.zygote
    assert zygote is not None
    return zygote


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once pid is no mount process any more (ended; a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    while _is_mount_process(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_forked_mount_process_serves_the_layer_and_is_recognised(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path
) -> None:
    manager = zygote_manager(tmp_path, managers)
    mnt = tmp_path / "fs"
    pid = mount(manager, layer, mnt)
    zygote = the_zygote(manager)
    assert parent_of(pid) == zygote.pid  # forked, not started by the manager
    assert isinstance(manager.supervisor.child(str(mnt)), ForkedChild)
    assert_tree_matches(mnt, expected_view(layer.tar, tmp_path), served=True)
    # Recognised as a mount process (the zygote is not one), in a session of its own, named.
    assert _is_mount_process(pid) and not _is_mount_process(zygote.pid)
    assert mount_problem(str(mnt)) is None
    assert os.getsid(pid) == pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == FORKED_NAME
    # It holds no end of the zygote's socket (so the zygote ends when the daemon does), and
    # writes its log where a plainly started one does.
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [fd for fd in fds if fd.startswith("socket:")], fds
    assert os.readlink(f"/proc/{pid}/fd/2") == str(tmp_path / "fs.lazysnap.log")
    assert "mounted sha256:" in (tmp_path / "fs.lazysnap.log").read_text()


def test_unmount_ends_the_forked_mount_process(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path
) -> None:
    manager = zygote_manager(tmp_path, managers)
    mnt = tmp_path / "fs"
    pid = mount(manager, layer, mnt)
    manager.unmount(str(mnt))
    assert gone(pid)
    assert not is_live(str(mnt)) and os.listdir(mnt) == []
    assert read_state(str(mnt)) is None


def test_a_killed_zygote_is_replaced_and_says_so(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = zygote_manager(tmp_path, managers)
    first = mount(manager, layer, tmp_path / "a")
    killed = the_zygote(manager)
    os.kill(killed.pid, signal.SIGKILL)
    killed.process.wait(10)
    with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
        second = mount(manager, layer, tmp_path / "b")
    assert f"zygote (pid {killed.pid}) failed: it exited (signal 9); starting a new one" in (
        caplog.text
    )
    assert parent_of(second) == the_zygote(manager).pid != killed.pid
    assert (tmp_path / "b/etc/hosts").read_bytes() == layer.data("etc/hosts")
    # The first layer's process never depended on its zygote.
    assert mount_problem(str(tmp_path / "a")) is None and _is_mount_process(first)


def test_a_zygote_that_cannot_run_falls_back_to_plain_mount_processes(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    python = tmp_path / "python-without-zygote"
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--zygote-fd*) echo "no zygote here" >&2; exit 3;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
        manager = zygote_manager(tmp_path, managers, python=str(python))
        pid = mount(manager, layer, tmp_path / "a")
    assert "failed: it exited (status 3); starting a new one" in caplog.text
    assert "zygote failed again (it exited (status 3)): starting mount processes plainly" in (
        caplog.text
    )
    assert manager.supervisor.starter.zygote is None
    assert isinstance(manager.supervisor.child(str(tmp_path / "a")), subprocess.Popen)
    assert parent_of(pid) == os.getpid()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
        mount(manager, layer, tmp_path / "b")  # given up on: no new attempt, no new warning
    assert "zygote" not in caplog.text
    assert (tmp_path / "b/etc/hosts").read_bytes() == layer.data("etc/hosts")


DAEMON = """
import sys, time
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from harness.url_blob import served_blob_spec
blob = served_blob_spec(sys.argv[3], sys.argv[4], int(sys.argv[6]))
spec = LayerSpec(blob=blob, index_path=sys.argv[5])
lazy = LazyLayers(LazyLayerSettings(sys.argv[1], 1 << 30, zygote=True))
lazy.mount_layer(sys.argv[2], spec)
print(lazy.supervisor.starter.zygote.pid, flush=True)
time.sleep(600)
"""


def test_a_restarted_daemon_adopts_mount_processes_its_zygote_forked(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path
) -> None:
    """The daemon dies: its zygote ends with it, the forked mount process serves on, and the next
    manager re-attaches to it, checks it, and stops it."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    index_file = tmp_path / "layer.index"
    index_file.write_bytes(encode_index(layer.index))
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-c", DAEMON, str(tmp_path / "cache"), str(mnt)),
            *(layer.server.url, layer.index.layer_digest, str(index_file), str(len(layer.blob))),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert daemon.stdout is not None
        zygote_pid = int(daemon.stdout.readline())
    finally:
        daemon.kill()
        daemon.wait()
    assert gone(zygote_pid)  # its end of the socket closed with the daemon
    pid = int(read_state(str(mnt))["pid"])  # type: ignore[index]
    assert mount_problem(str(mnt)) is None  # nobody's child, still serving

    restarted = zygote_manager(tmp_path, managers)
    restarted.mount_layer(str(mnt), layer.spec())  # re-attached, not mounted again
    restarted.check(str(mnt), {})
    assert int(read_state(str(mnt))["pid"]) == pid  # type: ignore[index]
    assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    restarted.unmount(str(mnt))
    assert gone(pid)
    assert not is_live(str(mnt))


def test_close_stops_the_zygote_and_leaves_mount_processes_serving(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path
) -> None:
    manager = zygote_manager(tmp_path, managers)
    pid = mount(manager, layer, tmp_path / "fs")
    zygote = the_zygote(manager)
    manager.close()
    assert zygote.process.wait(5) == 0
    assert mount_problem(str(tmp_path / "fs")) is None and _is_mount_process(pid)
    assert (tmp_path / "fs/etc/hosts").read_bytes() == layer.data("etc/hosts")
