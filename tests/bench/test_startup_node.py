"""bench/startup_node.py's ColdNode.wipe, the part of reset() that makes the node cold, without
a containerd or a daemon: it removes what a killed run left, also while one of that run's mount
processes (forked by the zygote: its command line does not name the node) still writes its
state file beside its mountpoint, which rmtree alone lost to once (the directory came back and
reset's mkdir raised FileExistsError)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from bench import startup_node
from bench.startup_node import ColdNode
from harness.procs import mounts_under, pid_alive, unmount_all_under

# Rewrites a state file in its directory ($STATE_DIR) as fast as it can and ignores SIGTERM,
# like a mount process busy saving its state on the way out; its stdout is its log there too.
# It says "written" on stderr once the file is there.
STRAGGLER = """
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
where = os.environ["STATE_DIR"]
said = False
while True:
    try:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "fs.lazysnap.json"), "w") as state:
            state.write("{}")
    except OSError:
        continue
    if not said:
        print("written", file=sys.stderr, flush=True)
        said = True
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ColdNode]:
    node = ColdNode(tmp_path / "n", "127.0.0.1:1", "wipe")
    yield node
    unmount_all_under(node.base)


def _straggler(node: ColdNode, where: Path) -> subprocess.Popen[bytes]:
    where.mkdir(parents=True)
    with (where / "fs.lazysnap.log").open("ab") as log:
        # the directory goes by the environment: its command line does not name the node
        process = subprocess.Popen(
            [sys.executable, "-c", STRAGGLER],
            stdout=log,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "STATE_DIR": str(where)},
            start_new_session=True,
        )
    assert process.stderr is not None
    assert process.stderr.readline() == b"written\n"
    return process


def test_wipe_removes_what_a_killed_run_left_while_a_mount_process_still_writes(
    node: ColdNode,
    monkeypatch: pytest.MonkeyPatch,
    skip_or_fail: Callable[[str], NoReturn],
) -> None:
    monkeypatch.setattr(startup_node, "STOP_GRACE_S", 0.5)
    snapshot = node.lazysnap_base / "snapshots" / "7"
    process = _straggler(node, snapshot)
    try:
        (node.containerd_base / "io.containerd.content.v1.content").mkdir(parents=True)
        mountpoint = snapshot / "fs"
        mountpoint.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=False)
        if mounted.returncode != 0:
            skip_or_fail("cannot mount a tmpfs here (needs root)")
        assert str(node.base) not in Path(f"/proc/{process.pid}/cmdline").read_text()

        node.wipe()

        assert not node.base.exists() or list(node.base.iterdir()) == []
        assert not pid_alive(process.pid)  # SIGKILLed: it ignored SIGTERM
        assert mounts_under(node.base) == []
        node.lazysnap_base.mkdir(parents=True)  # what reset() does next
    finally:
        process.kill()
        process.communicate()


def test_wiping_a_node_that_never_ran_or_twice_is_a_no_op(node: ColdNode) -> None:
    node.wipe()
    node.lazysnap_base.mkdir(parents=True)
    (node.lazysnap_base / "config.toml").write_text("")
    node.wipe()
    node.wipe()
    assert not node.lazysnap_base.exists() and not node.containerd_base.exists()
