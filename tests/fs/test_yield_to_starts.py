"""The work that follows a cold start yields to the next start: background fetch runs on a thread
at the lowest CPU and I/O priority in the real mount process, the completion check stops between
chunks while the node is busy and goes on after, and the copy's cp is stopped while the node is
busy and finishes the same tree after."""

from __future__ import annotations

import ctypes
import filecmp
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.low_priority import BACKGROUND_NICE, IOPRIO_CLASS_IDLE
from snapshotter.lazylayers.completion import PASSED, CheckReport, check_layer
from snapshotter.lazylayers.copy_helper import CP, _run_bounded
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import read_state
from tests.fs.fs_helpers import built_index, make_tar, rich_members
from tests.fs.manual_clock import ManualClock
from tests.fs.test_completion_check import _fill, _members
from tests.fs.test_fs_mount import Layer

_SYS_IOPRIO_GET = 252  # x86_64
_IOPRIO_WHO_PROCESS = 1


def _io_class(tid: int) -> int:
    value: int = ctypes.CDLL(None, use_errno=True).syscall(
        _SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, tid
    )
    assert value >= 0, f"ioprio_get({tid}) failed"
    return value >> 13


def _threads(pid: int) -> dict[int, str]:
    """tid -> the name the kernel shows for it (top -H, ps -L)."""
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
    return names


def _wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    """Poll what a mount process (another process) shows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def waiting_mount(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A mounted layer whose background fetch waits (an hour's quiet period): its thread
    stays there to be looked at. Yields the mountpoint and the mount process's pid."""
    tar = make_tar(rich_members())
    layer = Layer(tar, tar, built_index(tar, "tar"))
    manager = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"), 1 << 30, background=BackgroundSettings(quiet_seconds=3600)
        )
    )
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        manager.mount_layer(str(mnt), layer.spec())
        yield mnt, int(read_state(str(mnt))["pid"])  # type: ignore[index]
    finally:
        manager.unmount(str(mnt))
        manager.close()
        layer.server.stop()


@pytest.mark.stack
def test_background_fetch_runs_at_the_lowest_cpu_and_io_priority_the_fuse_threads_do_not(
    waiting_mount: tuple[Path, int],
) -> None:
    mnt, pid = waiting_mount
    assert _wait_for(lambda: "lazysnap-bg" in _threads(pid).values()), _threads(pid)
    assert (mnt / "etc/hosts").read_bytes()  # a request served: the FUSE threads exist
    threads = _threads(pid)
    [background] = [tid for tid, name in threads.items() if name == "lazysnap-bg"]
    assert os.getpriority(os.PRIO_PROCESS, background) == BACKGROUND_NICE
    assert _io_class(background) == IOPRIO_CLASS_IDLE
    # Everything else of the process serves a starting container: normal priority.
    others = [tid for tid in threads if tid != background]
    assert others and all(os.getpriority(os.PRIO_PROCESS, tid) == 0 for tid in others)


def test_the_completion_check_stops_between_chunks_while_the_node_is_busy(
    tmp_path: Path,
) -> None:
    tar = make_tar(_members())
    index = built_index(tar, "tar")
    clock = ManualClock()
    cache = SpanCache(tmp_path / "cache", 1 << 30, clock=clock)
    _fill(cache, index, tar, b"")
    node = NodeActivity(tmp_path / "cache", clock)
    gate = BusyGate(node, quiet_seconds=2.0)
    stop = threading.Event()
    chunks: list[int] = []

    def before_chunk() -> None:
        chunks.append(len(chunks))
        if len(chunks) == 3:
            node.note_busy()  # a container starts while the check runs
        gate.pause_while_busy(stop)

    reports: list[CheckReport] = []
    check = threading.Thread(
        target=lambda: reports.append(
            check_layer(index, cache, _diff(tar), chunk=16 << 10, before_chunk=before_chunk)
        )
    )
    check.start()
    try:
        clock.wait_for_blocked(1)  # paused at its third chunk
        assert len(chunks) == 3 and not reports
        clock.advance(1.0)  # still within the quiet period: it stays paused
        clock.wait_for_blocked(1)
        assert len(chunks) == 3 and not reports
        clock.advance(1.5)  # quiet for 2 s: it goes on to its verdict
        check.join(30)
    finally:
        stop.set()
        check.join(10)
    [report] = reports
    assert report.result == PASSED, report
    assert len(chunks) > 3 and report.bytes_checked == len(tar)


def _diff(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def test_the_copy_stops_while_the_node_is_busy_and_finishes_the_same_tree_after(
    tmp_path: Path,
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    total = 0
    for d in range(60):
        (source / f"d{d}").mkdir(parents=True)
        for n in range(100):
            (source / f"d{d}" / f"f{n}").write_bytes(b"%d/%d\n" % (d, n) * 200)
            total += 1
    copied: list[int] = []  # files in the target at each of the watchdog's looks

    def node_busy() -> bool:
        copied.append(sum(len(files) for _, _, files in os.walk(target)))
        return len(copied) <= 6  # busy for its first six looks, then quiet

    stopped = _run_bounded([*CP, "--", str(source), str(target)], tmp_path, 1 << 40, 0, node_busy)
    assert stopped == ""
    assert copied[0] < total, "cp finished before the watchdog's first look: a bigger tree"
    # Stopped at the first look (SIGSTOP); from the next look on, nothing more was written.
    assert len(set(copied[1:6])) == 1, copied
    # Let go at the seventh: the same tree as a copy that never stopped.
    assert sum(len(files) for _, _, files in os.walk(target)) == total
    compared = filecmp.dircmp(source, target)
    assert not compared.left_only and not compared.right_only and not compared.diff_files
    for d in range(60):
        _, mismatch, errors = filecmp.cmpfiles(
            source / f"d{d}", target / f"d{d}", [f"f{n}" for n in range(100)], shallow=False
        )
        assert not mismatch and not errors
