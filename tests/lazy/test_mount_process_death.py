"""A lazy layer's mount process killed (kill -9, as the OOM killer does) while a container reads
the layer, through the real stack: what the container sees, what the daemon does and says, what
`lazysnap status` shows, and that new containers of the image work (docs/how-it-works.md, "When
a mount process dies")."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack

MIB = 1 << 20
BIG_MIB = 48  # background fetch of the rest (and materializing) must not finish during the test
UNREAD_MIB = 40  # read only after the kill: far beyond the first MiB and its read-ahead
DETECT_TIMEOUT_S = 10.0
# The container reads one MiB, then waits for a line on stdin before each further step.
READER = f"""
dd if=/data/big bs=1M count=1 2>/dev/null | sha256sum
read go
if dd if=/data/big of=/dev/null bs=1M skip={UNREAD_MIB} count=1; then
  echo "read ok"
else
  echo "read failed"
fi
read go || echo "stdin closed"
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(mountpoint: Path) -> dict[str, Any]:
    state = json.loads(mountpoint.with_name(mountpoint.name + ".lazysnap.json").read_text())
    assert isinstance(state, dict)
    return state


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until condition() held; fails the test after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _status_layer(stack: LazyStack, layer_digest: str) -> dict[str, Any]:
    out = stack.lazysnap("status", "--root", str(stack.daemon.root), "--json").stdout
    layers = [layer for layer in json.loads(out)["layers"] if layer["layer_digest"] == layer_digest]
    assert len(layers) == 1, out
    layer = layers[0]
    assert isinstance(layer, dict)
    return layer


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE


def _lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str], timeout: float, what: str) -> str:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {what} from the container within {timeout:.0f} s") from None


def test_mount_process_killed_under_a_running_container(stack: LazyStack) -> None:
    """kill -9 of the mount process while a container reads its layer: the container's next read
    of an unfetched part fails with ENOTCONN (nothing can reconnect its overlay); the daemon
    notices at once, names the container in its log, records the death for `lazysnap status`
    and starts a new mount process, so a new container of the image reads the right bytes. Once
    the stranded container is gone, status no longer lists it."""
    image = build_data_image(stack.workdir / "death", {"big": BIG_MIB * MIB})
    pushed = stack.push(image.built, unique_name("test/death"))
    stack.index_build(pushed.reference, "--span-size", str(MIB))
    pulled = stack.pull(pushed.reference)
    assert (pulled.lazy, pulled.pulled) == (2, 0), pulled.stdout
    digest = image.data_layer
    big = image.files["data/big"]
    mountpoint = stack.lazy_mount(digest)
    old_pid = _state(mountpoint)["pid"]

    container = unique_name("lzs-death")
    reader = subprocess.Popen(
        [
            "ctr",
            "-a",
            str(stack.containerd.address),
            "-n",
            stack.namespace,
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            pushed.reference,
            container,
            "sh",
            "-c",
            READER,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None
    try:
        lines = _lines_of(reader)
        assert _next_line(lines, 120, "first MiB").split()[0] == _sha(big[:MIB])

        log_offset = stack.daemon_log_offset()
        os.kill(old_pid, signal.SIGKILL)
        death_line = f"mount process {old_pid} of lazy layer {digest}"
        noticed = _wait_for(
            lambda: death_line in stack.daemon_log_since(log_offset),
            DETECT_TIMEOUT_S,
            "the daemon logging the death",
        )
        logged = next(
            line for line in stack.daemon_log_since(log_offset).splitlines() if death_line in line
        )
        assert "died" in logged and f"{stack.namespace}/{container}" in logged, logged

        # The running container: its overlay holds the dead connection.
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert _next_line(lines, 60, "second read's outcome") == "read failed"

        # A new mount process serves the layer, less likely to be the OOM killer's pick.
        _wait_for(
            lambda: os.path.ismount(mountpoint) and _state(mountpoint)["pid"] != old_pid,
            30,
            "a new live mount process",
        )
        new_pid = _state(mountpoint)["pid"]
        if _has_cap_sys_resource():
            assert Path(f"/proc/{new_pid}/oom_score_adj").read_text().strip() == "-500"
        else:  # lowering it needs CAP_SYS_RESOURCE (some sandboxes drop it): said in its log
            log = mountpoint.with_name(mountpoint.name + ".lazysnap.log").read_text()
            assert "cannot set oom_score_adj to -500" in log, log[-2000:]
        layer = _status_layer(stack, digest)
        assert layer["state"] == "live" and layer["pid"] == new_pid, layer
        assert layer["deaths"] == 1, layer
        assert layer["stranded"] == [f"{stack.namespace}/{container}"], layer

        # New containers of the image read through the new process, with the right bytes.
        output = stack.run_ok(
            pushed.reference,
            "sh",
            "-c",
            f"dd if=/data/big bs=1M skip={UNREAD_MIB} count=1 2>/dev/null | sha256sum",
        )
        assert output.split()[0] == _sha(big[UNREAD_MIB * MIB : (UNREAD_MIB + 1) * MIB])

        # The stranded container, once restarted (here: ended), is no longer listed.
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0
        layer = _status_layer(stack, digest)
        assert layer["stranded"] == [] and layer["deaths"] == 1, layer
        print(f"death noticed {noticed:.2f} s after kill -9")
    finally:
        if reader.poll() is None:
            stack.containerd.ctr(
                "tasks", "kill", "-s", "SIGKILL", container, namespace=stack.namespace, check=False
            )
            reader.wait(timeout=60)
    stderr = reader.stderr.read() if reader.stderr else ""
    assert "not connected" in stderr, stderr


def test_mount_process_killed_while_the_daemon_is_down(stack: LazyStack) -> None:
    """The mount process dies while `lazysnap serve` is down (nothing follows it): the restarted
    daemon finds the dead mount, logs and records the death with the container it strands, and
    mounts the layer again, so status shows the layer live and the container to restart."""
    image = build_data_image(stack.workdir / "death-down", {"big": 4 * MIB})
    pushed = stack.push(image.built, unique_name("test/death-down"))
    stack.index_build(pushed.reference, "--span-size", str(MIB))
    assert stack.pull(pushed.reference).lazy == 2
    digest = image.data_layer
    mountpoint = stack.lazy_mount(digest)
    old_pid = _state(mountpoint)["pid"]
    container = unique_name("lzs-death-down")
    reader = subprocess.Popen(
        [
            "ctr",
            "-a",
            str(stack.containerd.address),
            "-n",
            stack.namespace,
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            pushed.reference,
            container,
            "sh",
            "-c",
            "head -c 1 /data/big >/dev/null && echo started; read go || echo stdin closed",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None
    try:
        assert _next_line(_lines_of(reader), 120, "start") == "started"
        stack.daemon.stop()
        os.kill(old_pid, signal.SIGKILL)
        _wait_for(lambda: not Path(f"/proc/{old_pid}").exists(), 10, "the mount process gone")
        log_offset = stack.daemon_log_offset()
        stack.daemon.start()
        _wait_for(
            lambda: os.path.ismount(mountpoint) and _state(mountpoint)["pid"] != old_pid,
            60,
            "the layer mounted again after the restart",
        )
        logged = stack.daemon_log_since(log_offset)
        assert f"mount process {old_pid} of lazy layer {digest}" in logged, logged[-3000:]
        layer = _status_layer(stack, digest)
        assert layer["state"] == "live" and layer["deaths"] == 1, layer
        assert layer["stranded"] == [f"{stack.namespace}/{container}"], layer
    finally:
        reader.stdin.close()
        try:
            reader.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.containerd.ctr(
                "tasks", "kill", "-s", "SIGKILL", container, namespace=stack.namespace, check=False
            )
            reader.wait(timeout=60)
        if not stack.daemon.alive():
            stack.daemon.start()
