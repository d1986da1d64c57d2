"""`lazysnap serve` stops its mount-process zygote when it stops: the zygote does not rely on
noticing the daemon's end of its socket close, so not even a zygote that never reads it (stuck,
stopped) outlives the daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.daemon import DaemonSettings, LazysnapDaemon, start_lazysnap
from harness.procs import pid_alive
from snapshotter.fs.zygote import ZYGOTE_NAME

pytestmark = pytest.mark.stack


def children_named(parent: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent and comm == name:
            found.append(int(entry.name))
    return found


def the_zygote_of(daemon: LazysnapDaemon, timeout: float = 10.0) -> int:
    """The daemon's zygote, once it has named itself (after its interpreter started)."""
    assert daemon.pid is not None
    deadline = time.monotonic() + timeout
    while not (found := children_named(daemon.pid, ZYGOTE_NAME)):
        assert time.monotonic() < deadline, f"no {ZYGOTE_NAME} child of the daemon:\n{daemon.log()}"
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LazysnapDaemon]:
    # Remote layers on (the zygote is `[fuse] zygote`, on by default); no registry is needed.
    instance = start_lazysnap(tmp_path / "lazysnap", settings=DaemonSettings(tmp_path / "hosts"))
    yield instance
    instance.kill()


def test_a_stopped_daemon_leaves_no_zygote_even_one_that_does_not_answer(
    daemon: LazysnapDaemon,
) -> None:
    zygote = the_zygote_of(daemon)
    os.kill(zygote, signal.SIGSTOP)  # it will never read the end of its socket
    try:
        assert daemon.stop() == 0
        assert not pid_alive(zygote), f"{ZYGOTE_NAME} {zygote} outlived the daemon"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote, signal.SIGKILL)
    log = daemon.log()
    assert "stopped" in log and "Traceback" not in log
