"""Materialization: a layer whose spans are all cached is copied into the plain directory under
its FUSE mount, which is then detached. Real FUSE mounts, real cp, a real tmpfs for disk full."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.fs.activity import NodeActivity
from snapshotter.fs.background import BackgroundSettings
from snapshotter.lazylayers.copy_helper import copy_budget
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.materializer import (
    MATERIALIZE_MAX_ATTEMPTS,
    MATERIALIZE_RETRY_MAX_S,
    Materializer,
)
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import (
    LocalMarker,
    bind_path,
    marker_path,
    read_marker,
    read_state,
    read_verdict,
    write_marker,
)
from snapshotter.status.collect import lazy_mounts
from tests.fs.fs_helpers import (
    Member,
    assert_tree_matches,
    built_index,
    expected_view,
    make_tar,
    rich_members,
)
from tests.fs.lazy_layers_helpers import (
    background_complete,
    is_live,
    is_local,
    known_mountpoints,
    materialize_now,
    until_watcher,
    watcher_passes,
)
from tests.fs.manual_clock import ManualClock
from tests.fs.test_fs_mount import Layer

pytestmark = pytest.mark.stack
QUICK = BackgroundSettings(quiet_seconds=0.0)
IN_PRIVATE_NAMESPACE = ("unshare", "--mount", "--propagation", "private", "sh", "-c")


@pytest.fixture
def layer() -> Iterator[Layer]:
    tar = make_tar(rich_members())
    instance = Layer(tar, tar, built_index(tar, "tar"))
    yield instance
    instance.server.stop()


@pytest.fixture
def clock() -> ManualClock:
    """The daemon side's time: the materializer's polls, retry delays and quiet periods pass
    when a test moves it (the mount processes keep real time)."""
    return ManualClock()


def _manager(tmp_path: Path, clock: ManualClock, *, materialize: bool = True) -> LazyLayers:
    return LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=5,
            background=QUICK,
            materialize=materialize,
            materialize_retry_s=3600,
        ),
        clock=clock,
    )


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[list[LazyLayers]]:
    """Managers a test makes; every mount they know is unmounted afterwards, and they close."""
    made: list[LazyLayers] = []
    yield made
    for manager in made:
        for mountpoint in known_mountpoints(manager):
            manager.unmount(mountpoint)
    for state in tmp_path.rglob("*.lazysnap.json"):
        made[0].unmount(str(state).removesuffix(".lazysnap.json"))
    for manager in made:
        manager.close()


def _wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll what a mount process (another process, on real time) shows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _is_mounted(path: Path) -> bool:
    return os.stat(path).st_dev != os.stat(path.parent).st_dev


def _pid_gone(pid: int, manager: LazyLayers) -> bool:
    for mountpoint in manager.supervisor.mountpoints():
        child = manager.supervisor.child(mountpoint)
        if child is not None:
            child.poll()  # a child of this test process: reap it, or it stays a zombie
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _underlying(mountpoint: Path) -> list[str]:
    """What the plain directory under a (possibly mounted) mountpoint holds, seen through a
    non-recursive bind of its parent in a private mount namespace."""
    script = 'mount --bind "$1" "$2" && ls -A "$2/$3"'
    view = mountpoint.parent / "view"
    view.mkdir(exist_ok=True)
    try:
        listed = subprocess.run(
            [
                *IN_PRIVATE_NAMESPACE,
                script,
                "sh",
                str(mountpoint.parent),
                str(view),
                mountpoint.name,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        view.rmdir()
    return listed.stdout.split()


def test_a_complete_layer_becomes_plain_files_equal_to_the_layer(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    manager = _manager(tmp_path, clock)
    managers.append(manager)
    mnt = tmp_path / "snapshots" / "1" / "fs"
    mnt.mkdir(parents=True)
    manager.mount_layer(str(mnt), layer.spec())
    pid = read_state(str(mnt))["pid"]  # type: ignore[index]
    # A reader that started on the FUSE mount (as a running container does) keeps it alive.
    with open(mnt / "usr/lib/big.bin", "rb") as held:
        assert _wait_for(lambda: background_complete(mnt))
        # The marker comes first, the detach right after it.
        assert until_watcher(lambda: is_local(str(mnt)) and not _is_mounted(mnt), clock), (
            f"not local; state {read_state(str(mnt))}"
        )
        assert_tree_matches(mnt, expected_view(layer.tar, tmp_path), served=False)
        tool, link = os.stat(mnt / "usr/bin/tool"), os.stat(mnt / "usr/bin/tool-link")
        assert tool.st_ino == link.st_ino  # the hardlink is one inode in the copy too
        assert stat.S_ISCHR(os.lstat(mnt / "gone").st_mode)  # whiteout: a 0/0 char device
        [status] = lazy_mounts(str(tmp_path))
        assert is_local(str(mnt)) and status.problem is not None
        assert status.background == "complete"
        # The detached mount still serves its user, from its own process.
        assert held.read() == layer.data("usr/lib/big.bin")
        assert not _pid_gone(pid, manager)
    assert _wait_for(lambda: _pid_gone(pid, manager), 15), f"mount process {pid} still runs"
    assert read_marker(str(mnt)) == LocalMarker(
        layer.index.layer_digest,
        read_marker(str(mnt)).materialized_at,  # type: ignore[union-attr]
    )
    assert not bind_path(str(mnt)).exists()
    manager.check(str(mnt), {})  # local counts as live, without any mount

    # A restarted manager neither mounts it again nor wipes it.
    restarted = _manager(tmp_path, clock)
    managers.append(restarted)
    restarted.check(str(mnt), {})
    restarted.mount_layer(str(mnt), layer.spec())
    assert not _is_mounted(mnt) and is_live(str(mnt))
    assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")

    # Unmounting forgets it: no marker, no sidecars; the copy goes with the snapshot dir.
    restarted.unmount(str(mnt))
    assert not marker_path(str(mnt)).exists()
    assert sorted(os.listdir(mnt.parent)) == ["fs", "fs.lazysnap.log"]  # the log stays, as ever
    with pytest.raises(RemoteLayerUnavailable, match="not mounted"):
        restarted.check(str(mnt), {})


def test_without_materialize_the_layer_stays_on_fuse(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    manager = _manager(tmp_path, clock, materialize=False)
    managers.append(manager)
    mnt = tmp_path / "fs"
    mnt.mkdir()
    manager.mount_layer(str(mnt), layer.spec())
    assert _wait_for(lambda: background_complete(mnt))
    watcher_passes(clock, 2)  # the first one checks the complete layer: a copy would follow
    assert read_verdict(str(mnt)) is not None  # the check did run
    assert _is_mounted(mnt) and not is_local(str(mnt))
    assert _underlying(mnt) == []


def test_a_failing_copy_leaves_fuse_serving_and_no_partial_tree(
    layer: Layer,
    managers: list[LazyLayers],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    clock: ManualClock,
) -> None:
    small = tmp_path / "small"  # the snapshot dir on a filesystem too small for the layer
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(small)], check=True)
    try:
        manager = _manager(tmp_path, clock)
        managers.append(manager)
        mnt = small / "fs"
        mnt.mkdir()
        with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
            manager.mount_layer(str(mnt), layer.spec())
            assert _wait_for(lambda: background_complete(mnt))
            assert until_watcher(lambda: "stays lazy" in caplog.text, clock), caplog.text
        [line] = [r.getMessage() for r in caplog.records if "stays lazy" in r.getMessage()]
        # refused before cp wrote anything: the files would not leave the reserve free
        assert layer.index.layer_digest in line and "free space there" in line, line
        assert _is_mounted(mnt) and not is_local(str(mnt))
        manager.check(str(mnt), {})
        assert (mnt / "usr/lib/big.bin").read_bytes() == layer.data("usr/lib/big.bin")
        assert _underlying(mnt) == []  # the partial copy was wiped
        assert not marker_path(str(mnt)).exists() and not bind_path(str(mnt)).exists()
        assert not materialize_now(manager, str(mnt))  # and fails again, the same way
        manager.unmount(str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_copy_left_by_a_crash_is_wiped_and_redone(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    manager = _manager(tmp_path, clock, materialize=False)
    managers.append(manager)
    mnt = tmp_path / "fs"
    mnt.mkdir()
    manager.mount_layer(str(mnt), layer.spec())
    # What a copy killed half-way leaves: files under the mount, no marker.
    script = 'mount --bind "$1" "$2" && mkdir "$2/fs/etc" && echo stale > "$2/fs/etc/stale"'
    view = tmp_path / "view"
    view.mkdir()
    subprocess.run(
        [*IN_PRIVATE_NAMESPACE, script, "sh", str(tmp_path), str(view)],
        check=True,
    )
    view.rmdir()
    assert _underlying(mnt) == ["etc"]
    # Only a layer that passed its completion check is copied, and that needs every span.
    assert _wait_for(lambda: background_complete(mnt))
    assert materialize_now(manager, str(mnt))
    assert_tree_matches(mnt, expected_view(layer.tar, tmp_path), served=False)


def test_a_leftover_copy_is_wiped_before_fuse_mounts_again(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    """After a reboot mid-copy: no FUSE mount, a partial tree, the spec of the last mount."""
    manager = _manager(tmp_path, clock, materialize=False)
    managers.append(manager)
    mnt = tmp_path / "fs"
    (mnt / "etc").mkdir(parents=True)
    (mnt / "etc/stale").write_text("half a copy\n")
    (tmp_path / "fs.lazysnap-spec.json").write_text("{}")
    manager.mount_layer(str(mnt), layer.spec())
    assert not (mnt / "etc/stale").exists()  # the FUSE view
    assert _underlying(mnt) == []


def test_a_directory_new_to_lazysnap_is_never_wiped(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    manager = _manager(tmp_path, clock, materialize=False)
    managers.append(manager)
    mnt = tmp_path / "fs"
    mnt.mkdir()
    (mnt / "mine").write_text("not lazysnap's\n")
    manager.mount_layer(str(mnt), layer.spec())
    assert _underlying(mnt) == ["mine"]


def test_a_marker_written_before_a_crash_detaches_the_mount_on_check(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    """The daemon stopped between writing the marker and detaching FUSE: the next check()
    finishes the job (the marker is only ever written over a complete, synced copy)."""
    manager = _manager(tmp_path, clock, materialize=False)
    managers.append(manager)
    mnt = tmp_path / "fs"
    mnt.mkdir()
    manager.mount_layer(str(mnt), layer.spec())
    write_marker(str(mnt), LocalMarker(layer.index.layer_digest, clock.time()))
    restarted = _manager(tmp_path, clock)
    managers.append(restarted)
    restarted.check(str(mnt), {})
    assert not _is_mounted(mnt)


def test_marker_reading_writing_and_damage(tmp_path: Path) -> None:
    mountpoint = str(tmp_path / "fs")
    assert read_marker(mountpoint) is None
    write_marker(mountpoint, LocalMarker("sha256:ab", 12.5))
    assert read_marker(mountpoint) == LocalMarker("sha256:ab", 12.5)
    assert sorted(os.listdir(tmp_path)) == ["fs.lazysnap-local"]  # no temp file left
    # Written atomically, so a marker that is there means local even if it reads badly.
    marker_path(mountpoint).write_text("not json")
    assert read_marker(mountpoint) == LocalMarker("", 0.0)


def test_a_complete_layer_is_not_copied_while_the_node_is_busy(
    layer: Layer, managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    # A container starting on other layers (its mounts serving bursts of requests) must not
    # share the two cores and the disk with a copy: the copy waits for a quiet node.
    settings = LazyLayerSettings(
        str(tmp_path / "cache"),
        1 << 30,
        fetch_timeout=5,
        background=QUICK,
        materialize=True,
        materialize_retry_s=3600,
    )
    manager = LazyLayers(settings, clock=clock)
    managers.append(manager)
    # The mount process's own background fetch should not wait here (QUICK): only the copy,
    # which waits for 2 s without a busy mount, is tested.
    manager.materializer = Materializer(
        dataclasses.replace(settings, background=BackgroundSettings(quiet_seconds=2.0)),
        manager.ledger,
        manager.supervisor,
        clock,
    )
    node = NodeActivity(str(tmp_path / "cache"), clock)  # the other layers' mounts
    mnt = tmp_path / "fs"
    mnt.mkdir()
    manager.mount_layer(str(mnt), layer.spec())
    assert _wait_for(lambda: background_complete(mnt))
    for _ in range(3):  # the watcher's passes over 3 s, the node busy all along
        node.note_busy()
        watcher_passes(clock, 1)
    assert _is_mounted(mnt) and not is_local(str(mnt))
    # Quiet for 2 s: the copy runs.
    assert until_watcher(lambda: is_local(str(mnt)), clock, 15)


def _many_directories() -> Layer:
    """30 directories of 5 files: listing them all is what a warm start does (python lists
    each package directory it imports from, the kernel holds everything else)."""
    members = []
    for d in range(30):
        members.append(Member(f"pkg-{d}", kind=tarfile.DIRTYPE, mode=0o755))
        members += [Member(f"pkg-{d}/mod-{n}.py", data=b"%d-%d" % (d, n)) for n in range(5)]
    tar = make_tar(members)
    return Layer(tar, tar, built_index(tar, "tar"))


def _walk(mnt: Path, *, niced: bool) -> None:
    """List every directory and read every file of mnt from a process of its own: at nice 19,
    as the copy's cp reads a complete layer, or at nice 0, as a container starting."""
    command = ["find", str(mnt), "-type", "f", "-exec", "cat", "{}", "+"]
    subprocess.run(["nice", "-n", "19", *command] if niced else command, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _complete_and_counted(mnt: Path) -> None:
    """Wait until the layer's background fetch is complete and the mount process has written
    a state after that (it once stopped counting requests right there)."""
    assert _wait_for(lambda: background_complete(mnt))
    complete_at = (read_state(str(mnt)) or {})["updated_at"]
    assert _wait_for(lambda: (read_state(str(mnt)) or {})["updated_at"] != complete_at)


def test_reads_by_background_work_do_not_make_the_node_busy_a_warm_start_does(
    managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    # The copy to plain files reads a complete layer through FUSE at nice 19: a burst, but not
    # a container starting, so it must not hold back the node's background work. A container
    # starting on the same complete layer (everything cached: only directory listings reach
    # the mount) is a start, and the node's work after it waits for it.
    many = _many_directories()
    try:
        manager = _manager(tmp_path, clock, materialize=False)
        managers.append(manager)
        mnt = tmp_path / "fs"
        mnt.mkdir()
        manager.mount_layer(str(mnt), many.spec())
        _complete_and_counted(mnt)
        node = NodeActivity(str(tmp_path / "cache"))
        _walk(mnt, niced=True)  # every listing and every read reaches the mount process
        assert node.seconds_since_busy() == math.inf
        _walk(mnt, niced=False)  # warm: 30 listings, nothing else
        assert node.seconds_since_busy() < math.inf
    finally:
        many.server.stop()


def test_a_warm_start_on_a_complete_layer_holds_its_copy_back(
    managers: list[LazyLayers], tmp_path: Path, clock: ManualClock
) -> None:
    many = _many_directories()
    settings = LazyLayerSettings(
        str(tmp_path / "cache"),
        1 << 30,
        fetch_timeout=5,
        background=QUICK,
        materialize=True,
        materialize_retry_s=3600,
    )
    try:
        manager = LazyLayers(settings, clock=clock)
        managers.append(manager)
        # The copy waits for 2 s of the clock without a busy mount (the mount process's own
        # background fetch does not wait: QUICK).
        manager.materializer = Materializer(
            dataclasses.replace(settings, background=BackgroundSettings(quiet_seconds=2.0)),
            manager.ledger,
            manager.supervisor,
            clock,
        )
        mnt = tmp_path / "fs"
        mnt.mkdir()
        # The first walk (fetching the spans, nice 0) comes before the watcher knows the
        # layer; the warm start after the layer is complete is what is tested.
        manager.mount_layer(str(mnt), many.spec())
        _complete_and_counted(mnt)
        started = time.time()
        _walk(mnt, niced=False)
        # The mount noted the start on the real clock; the watcher's clock is at most now.
        clock.advance(max(0.0, started - clock.time()))
        watcher_passes(clock, 1, 0.5)
        watcher_passes(clock, 2, 0.5)  # 1.5 s after the start: still within the 2 s
        assert _is_mounted(mnt) and not is_local(str(mnt))
        assert until_watcher(lambda: is_local(str(mnt)), clock, 15)  # then it is copied
        assert_tree_matches(mnt, expected_view(many.tar, tmp_path), served=False)
    finally:
        many.server.stop()


def _aliasing(layer: Layer, copies: int) -> Layer:
    """The layer's index with `copies` more files that all point at big.bin's data: a tree
    whose files add up to many times the layer."""
    big = next(e for e in layer.index.entries if e.name == "usr/lib/big.bin")
    extra = tuple(dataclasses.replace(big, name=f"usr/lib/alias-{n}.bin") for n in range(copies))
    index = dataclasses.replace(layer.index, entries=(*layer.index.entries, *extra))
    return Layer(layer.tar, layer.blob, index)


def test_a_tree_whose_files_add_up_to_more_than_the_layer_has_no_copy_budget(
    layer: Layer,
) -> None:
    """50 entries sharing one file's data once made the copy write 100 MiB from a small layer.
    decode_index now refuses overlapping data ranges, so such an index never reaches a mount
    (tests/index, tests/lazy/test_disk_limits.py); the copy's budget still refuses it on its
    own (a second line, for any index that got past the decoder)."""
    aliased = _aliasing(layer, 50).index
    budget = copy_budget(aliased)
    assert budget.file_bytes > budget.layer_bytes == aliased.uncompressed_size
    genuine = copy_budget(layer.index)
    assert genuine.file_bytes <= genuine.layer_bytes


def test_a_copy_that_keeps_failing_is_tried_three_times_then_given_up(
    layer: Layer,
    managers: list[LazyLayers],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    clock: ManualClock,
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(small)], check=True)
    try:
        manager = LazyLayers(
            LazyLayerSettings(
                str(tmp_path / "cache"),
                1 << 30,
                fetch_timeout=5,
                background=QUICK,
                materialize=True,
                materialize_retry_s=5,  # then 10: the clock moves a second per pass
            ),
            clock=clock,
        )
        managers.append(manager)
        mnt = small / "fs"
        mnt.mkdir()
        with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
            manager.mount_layer(str(mnt), layer.spec())
            assert _wait_for(lambda: background_complete(mnt))
            assert until_watcher(lambda: "giving up" in caplog.text, clock), caplog.text
        tries = [r.getMessage() for r in caplog.records if "stays lazy" in r.getMessage()]
        assert len(tries) == MATERIALIZE_MAX_ATTEMPTS, tries
        assert "failed 3 time(s)" in tries[-1] and "free space there" in tries[-1]
        watcher_passes(clock, 3, MATERIALIZE_RETRY_MAX_S)  # longer than any retry delay
        assert sum("stays lazy" in r.getMessage() for r in caplog.records) == len(tries)
        assert (mnt / "usr/lib/big.bin").read_bytes() == layer.data("usr/lib/big.bin")
        manager.unmount(str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
