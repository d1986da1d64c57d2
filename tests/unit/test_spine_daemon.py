"""The real `lazysnap serve` process over its unix socket: every RPC, error codes, the root lock,
signals, sd_notify, and kill -9 at awkward moments followed by a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.unit.spine_helpers import NAMESPACE, DaemonProcess, serve_command, start_daemon

MD = (("containerd-namespace", NAMESPACE),)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def names(stub: Any, *filters: str) -> list[str]:
    return [
        info.name
        for response in stub.List(pb.ListSnapshotsRequest(filters=list(filters)), metadata=MD)
        for info in response.info
    ]


def prepare(stub: Any, key: str, parent: str = "", **labels: str) -> Any:
    return stub.Prepare(
        pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels), metadata=MD
    ).mounts


def commit(stub: Any, name: str, key: str) -> None:
    stub.Commit(pb.CommitSnapshotRequest(name=name, key=key), metadata=MD)


def test_every_rpc_over_the_socket(daemon: DaemonProcess) -> None:
    stub = daemon.stub
    assert names(stub) == []  # empty store: an empty stream, not NotFound
    [mount] = prepare(stub, "a", l1="v1")
    assert (mount.type, list(mount.options)) == ("bind", ["rw", "rbind"])
    assert list(stub.Mounts(pb.MountsRequest(key="a"), metadata=MD).mounts) == [mount]
    Path(mount.source, "file").write_bytes(b"x" * 10000)
    usage = stub.Usage(pb.UsageRequest(key="a"), metadata=MD)
    assert usage.inodes == 2 and usage.size >= 10000
    commit(stub, "c", "a")
    info = stub.Stat(pb.StatSnapshotRequest(key="c"), metadata=MD).info
    assert info.kind == pb.COMMITTED and info.name == "c" and dict(info.labels) == {}
    assert info.created_at == info.updated_at and info.created_at.seconds > 0
    [view] = stub.View(pb.ViewSnapshotRequest(key="v", parent="c"), metadata=MD).mounts
    assert (view.source, list(view.options)) == (mount.source, ["ro", "rbind"])
    [overlay] = prepare(stub, "b", "c")
    assert overlay.type == "overlay" and f"lowerdir={mount.source}" in overlay.options
    updated = stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="b", labels={"x": "1"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.x"]),
        ),
        metadata=MD,
    ).info
    assert dict(updated.labels) == {"x": "1"} and updated.kind == pb.ACTIVE
    assert names(stub) == ["b", "c", "v"]
    assert names(stub, "kind==active", "kind==view") == ["b", "v"]
    assert names(stub, "parent==c,labels.x==1") == ["b"]
    stub.Remove(pb.RemoveSnapshotRequest(key="v"), metadata=MD)
    stub.Cleanup(pb.CleanupRequest(), metadata=MD)
    assert names(stub) == ["b", "c"]
    # The namespace arrives as metadata and is logged.
    assert f"{NAMESPACE}: prepare 'a'" in daemon.log


def test_errors_carry_containerds_grpc_codes(daemon: DaemonProcess) -> None:
    stub = daemon.stub
    prepare(stub, "a")
    stub.View(pb.ViewSnapshotRequest(key="v"), metadata=MD)
    cases = {
        "missing parent": (
            lambda: prepare(stub, "k", "missing"),
            grpc.StatusCode.NOT_FOUND,
        ),
        "duplicate key": (lambda: prepare(stub, "a"), grpc.StatusCode.ALREADY_EXISTS),
        "commit of a view": (lambda: commit(stub, "c", "v"), grpc.StatusCode.FAILED_PRECONDITION),
        "oversized label": (
            lambda: prepare(stub, "big", big="x" * 4096),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "immutable field": (
            lambda: stub.Update(
                pb.UpdateSnapshotRequest(
                    info=pb.Info(name="a", parent="other"),
                    update_mask=field_mask_pb2.FieldMask(paths=["parent"]),
                ),
                metadata=MD,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "bad filter": (lambda: names(stub, "name=="), grpc.StatusCode.INVALID_ARGUMENT),
        "stat of nothing": (
            lambda: stub.Stat(pb.StatSnapshotRequest(key="zz"), metadata=MD),
            grpc.StatusCode.NOT_FOUND,
        ),
    }
    for what, (call, expected) in cases.items():
        assert code_of(call) == expected, what
    commit(stub, "c", "a")
    prepare(stub, "child", "c")
    assert (
        code_of(lambda: stub.Remove(pb.RemoveSnapshotRequest(key="c"), metadata=MD))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        code_of(lambda: stub.Mounts(pb.MountsRequest(key="c"), metadata=MD))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert names(stub) == ["c", "child", "v"]


def test_list_streams_blocks_of_one_hundred(daemon: DaemonProcess) -> None:
    stub = daemon.stub
    for index in range(250):
        stub.View(pb.ViewSnapshotRequest(key=f"view-{index:03d}"), metadata=MD)
    responses = list(stub.List(pb.ListSnapshotsRequest(), metadata=MD))
    assert [len(r.info) for r in responses] == [100, 100, 50]
    assert len(names(stub, "name~=^view-1")) == 100


def test_socket_is_0660_and_sigterm_stops_cleanly(daemon: DaemonProcess) -> None:
    assert stat.S_IMODE(os.stat(daemon.address).st_mode) == 0o660
    prepare(daemon.stub, "a")
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.address.exists()
    assert "stopped" in daemon.log


def test_a_second_daemon_on_the_same_root_exits_2_and_leaves_the_first_alone(
    daemon: DaemonProcess, daemon_dir: Path
) -> None:
    other_socket = daemon_dir / "other.sock"
    result = subprocess.run(
        serve_command(daemon.root, daemon.address), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    expected = f"error: another lazysnap daemon holds {daemon.root}/lock (pid {daemon.proc.pid})"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not other_socket.exists()
    prepare(daemon.stub, "still-served")  # the first daemon's socket was not touched


def test_a_stale_socket_file_is_replaced(daemon_dir: Path, daemons: list[DaemonProcess]) -> None:
    address = daemon_dir / "lazysnap.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(address))
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves
    daemons.append(start_daemon(daemon_dir / "root", address, daemon_dir / "log"))
    assert names(daemons[-1].stub) == []


def test_ready_is_sent_to_notify_socket(daemon_dir: Path, daemons: list[DaemonProcess]) -> None:
    notify_path = daemon_dir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    try:
        daemons.append(
            start_daemon(
                daemon_dir / "root",
                daemon_dir / "lazysnap.sock",
                daemon_dir / "log",
                env={"NOTIFY_SOCKET": str(notify_path)},
            )
        )
        assert notify.recv(100) == b"READY=1"
        assert daemons[-1].stop() == 0
        assert notify.recv(100) == b"STOPPING=1"
    finally:
        notify.close()


def test_config_errors_name_the_key_and_file(daemon_dir: Path) -> None:
    config = daemon_dir / "bad.toml"
    config.write_text("[remote]\nenable = 'yes'\n")
    result = subprocess.run(
        [*serve_command(daemon_dir / "r", daemon_dir / "s.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and "remote.enable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (daemon_dir / "r").exists()


# -- kill -9 and restart --------------------------------------------------------------------------


def restart(old: DaemonProcess, daemons: list[DaemonProcess], *extra: str) -> DaemonProcess:
    new = start_daemon(old.root, old.address, old.log_path, *extra)
    daemons.append(new)
    return new


def wait_for_log(daemon: DaemonProcess, text: str, after: int = 0) -> None:
    """Return as soon as the daemon logged text (it logs each RPC as it starts)."""
    deadline = time.monotonic() + 30
    while text not in daemon.log[after:]:
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.001)


def snapshot_dirs(root: Path) -> set[str]:
    return set(os.listdir(root / "snapshots"))


def assert_consistent(daemon: DaemonProcess) -> None:
    """After Cleanup, the directories are exactly those of the listed snapshots."""
    stub = daemon.stub
    stub.Cleanup(pb.CleanupRequest(), metadata=MD)
    listed = names(stub)
    dirs = snapshot_dirs(daemon.root)
    assert len(dirs) == len(listed), (dirs, listed)
    for name in listed:
        info = stub.Stat(pb.StatSnapshotRequest(key=name), metadata=MD).info
        if info.kind != pb.COMMITTED:
            for mount in stub.Mounts(pb.MountsRequest(key=name), metadata=MD).mounts:
                paths = [mount.source] + [o.split("=", 1)[1] for o in mount.options if "dir=" in o]
                for path in paths:
                    if path != "overlay":
                        for part in path.split(":"):
                            assert Path(part).is_dir(), (name, part)


def test_kill_between_prepare_and_commit(
    daemon: DaemonProcess, daemons: list[DaemonProcess]
) -> None:
    [mount] = prepare(daemon.stub, "base-extract")
    Path(mount.source, "f").write_text("unpacked")
    commit(daemon.stub, "base", "base-extract")
    [layer] = prepare(daemon.stub, "layer-extract", "base")
    daemon.stop(signal.SIGKILL)
    # What an interrupted operation leaves behind: a half-built directory.
    (daemon.root / "snapshots" / "new-interrupted" / "fs").mkdir(parents=True)
    new = restart(daemon, daemons)
    stub = new.stub
    assert names(stub) == ["base", "layer-extract"]
    assert list(stub.Mounts(pb.MountsRequest(key="layer-extract"), metadata=MD).mounts) == [layer]
    assert_consistent(new)
    commit(stub, "layer", "layer-extract")
    assert names(stub, "kind==committed") == ["base", "layer"]


@pytest.mark.slow
def test_kill_during_slow_commit_and_remove(
    daemon: DaemonProcess, daemons: list[DaemonProcess]
) -> None:
    [mount] = prepare(daemon.stub, "big")
    upper = Path(mount.source)
    for d in range(100):  # Commit walks every inode of the upper dir: make that take a while
        sub = upper / f"d{d}"
        sub.mkdir()
        for f in range(500):
            (sub / f"f{f}").touch()
    future = daemon.stub.Commit.future(
        pb.CommitSnapshotRequest(name="big-c", key="big"), metadata=MD, timeout=60
    )
    wait_for_log(daemon, "commit 'big' as 'big-c'")
    daemon.stop(signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        future.result()
    new = restart(daemon, daemons, "--log-level", "debug")
    # Either the commit happened entirely or not at all.
    assert names(new.stub) in (["big"], ["big-c"])
    assert_consistent(new)
    key = names(new.stub)[0]
    if key == "big":
        commit(new.stub, "big-c", "big")
    log_size = len(new.log)

    future = new.stub.Remove.future(pb.RemoveSnapshotRequest(key="big-c"), metadata=MD, timeout=60)
    wait_for_log(new, "remove 'big-c'", after=log_size)
    new.stop(signal.SIGKILL)
    with contextlib.suppress(grpc.RpcError):
        future.result()
    third = restart(new, daemons)
    assert names(third.stub) in ([], ["big-c"])
    assert_consistent(third)


def test_concurrent_clients_all_get_consistent_answers(daemon: DaemonProcess) -> None:
    stub = daemon.stub
    prepare(stub, "base-x")
    commit(stub, "base", "base-x")
    failures: list[BaseException] = []

    def client(worker: int) -> None:
        try:
            for step in range(10):
                key = f"w{worker}-{step}"
                prepare(stub, key, "base")
                commit(stub, f"{key}-c", key)
                stub.Remove(pb.RemoveSnapshotRequest(key=f"{key}-c"), metadata=MD)
                prepare(stub, key, "base")
                names(stub, f"name=={key}")
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert len(names(stub, "kind==active")) == 80
    assert_consistent(daemon)


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_commit_finish(daemon: DaemonProcess) -> None:
    [mount] = prepare(daemon.stub, "big")
    upper = Path(mount.source)
    for d in range(60):
        sub = upper / f"d{d}"
        sub.mkdir()
        for f in range(500):
            (sub / f"f{f}").touch()
    future = daemon.stub.Commit.future(
        pb.CommitSnapshotRequest(name="big-c", key="big"), metadata=MD, timeout=60
    )
    wait_for_log(daemon, "commit 'big' as 'big-c'")
    daemon.proc.send_signal(signal.SIGTERM)
    future.result()  # answered, not cut off
    assert daemon.proc.wait(timeout=30) == 0
    restarted = start_daemon(daemon.root, daemon.address, daemon.log_path)
    try:
        assert names(restarted.stub) == ["big-c"]
    finally:
        assert restarted.stop() == 0


def test_startup_errors_name_the_file_and_touch_nothing(daemon_dir: Path) -> None:
    root = daemon_dir / "root"
    root.mkdir()
    not_a_socket = daemon_dir / "precious.txt"
    not_a_socket.write_text("keep me")
    result = subprocess.run(
        serve_command(root, not_a_socket), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"error: {not_a_socket} exists and is not a socket" in result.stderr
    assert not_a_socket.read_text() == "keep me"

    (root / "metadata.db").write_text("not sqlite")
    result = subprocess.run(
        serve_command(root, daemon_dir / "s.sock"), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"{root}/metadata.db: cannot open snapshot metadata" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (daemon_dir / "s.sock").exists()


def test_a_root_or_cache_dir_others_can_write_to_is_refused(daemon_dir: Path) -> None:
    root = daemon_dir / "open-root"
    root.mkdir()
    os.chmod(root, 0o777)
    result = subprocess.run(
        serve_command(root, daemon_dir / "s.sock"), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"root {root} is writable by other users" in result.stderr
    assert "chmod go-w" in result.stderr
    assert not (root / "metadata.db").exists()

    shared = daemon_dir / "shared-cache"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: sticky, but anyone can create names in it
    config = daemon_dir / "cache.toml"
    config.write_text(f'[cache]\ndir = "{shared}"\n')
    private_root = daemon_dir / "root"
    result = subprocess.run(
        [*serve_command(private_root, daemon_dir / "s.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"[cache] dir {shared} is writable by other users" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_root_and_the_metadata_are_private_whatever_the_umask(
    daemon_dir: Path, daemons: list[DaemonProcess]
) -> None:
    root = daemon_dir / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    old = os.umask(0o022)
    try:
        daemons.append(start_daemon(root, daemon_dir / "s.sock", daemon_dir / "log"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (root / "metadata.db").exists()
    for name in ("metadata.db", "metadata.db-wal"):
        path = root / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_prepare_on_a_full_disk_names_the_filesystem_and_the_fix(
    daemon_dir: Path, daemons: list[DaemonProcess]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = daemon_dir / "small-root"
    root.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64,mode=0700", "tmpfs", str(root)],
        check=True,
    )
    try:
        daemon = start_daemon(root, daemon_dir / "s.sock", daemon_dir / "log")
        daemons.append(daemon)
        prepare(daemon.stub, "first")
        filler = root / "filler"  # a container's writes fill the disk; then inodes run out too
        with contextlib.suppress(OSError):
            filler.write_bytes(b"x" * (2 << 20))
        for n in range(64):
            with contextlib.suppress(OSError):
                (root / f"f{n}").touch()
        with pytest.raises(grpc.RpcError) as raised:
            prepare(daemon.stub, "second")
        message = raised.value.details() or ""
        assert "is full: free space there" in message, message
        assert str(root) in message, message
    finally:
        for daemon in daemons:
            daemon.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)
