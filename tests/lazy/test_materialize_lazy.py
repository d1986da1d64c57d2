"""Materialization through the real stack: a lazily pulled image whose background fetch completes
becomes plain files; new containers see exactly containerd's own overlayfs unpack, a container
started before keeps reading through the detached FUSE mount, restarts keep it local, and
removing the image removes everything.

Its own containerd and lazysnap daemon (background fetch on, short quiet period): the session
daemon runs with background fetch off (tests/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.containerd import Containerd, start_containerd
from harness.daemon import LazysnapDaemon, start_lazysnap
from harness.procs import unmount_all_under
from harness.registry import Registry
from harness.trust import SigningKeys
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.edge_layer import MOTD, edge_layer_tar, stack_layer
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name
from tests.lazy.rootfs_walker import describe

pytestmark = pytest.mark.stack
QUIET_SECONDS = 3  # long enough to start a container on the FUSE mounts first
LOCAL_TIMEOUT_S = 120.0


def _config(base: Path, registry: Registry, hosts_dir: Path, trusted_key: Path) -> Path:
    path = base / "config.toml"
    base.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join(
            [
                f'root = "{base / "root"}"',
                f'address = "{base / "lazysnap.sock"}"',
                "[remote]",
                f'hosts_dir = "{hosts_dir}"',
                f'plain_http = ["{registry.host}"]',
                "min_layer_size = 0",
                "fetch_timeout_seconds = 10",
                "[fetch]",
                "background = true",
                f"background_quiet_seconds = {QUIET_SECONDS}",
                "materialize = true",
                "[trust]",
                f'public_keys = ["{trusted_key}"]',
            ]
        )
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def own_stack(
    registry: Registry, index_signing_keys: SigningKeys
) -> Iterator[tuple[Containerd, LazysnapDaemon]]:
    base = Path(tempfile.mkdtemp(prefix="lzs-mat-", dir="/tmp"))  # short: unix socket paths
    containerd = start_containerd(
        base / "ctd",
        proxy_socket=base / "lazysnap" / "lazysnap.sock",
        registry_hosts=[registry.host],
    )
    try:
        config = _config(
            base / "lazysnap", registry, containerd.hosts_dir, index_signing_keys.public
        )
        daemon = start_lazysnap(base / "lazysnap", config=config)
    except BaseException:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    yield containerd, daemon
    containerd.stop()
    daemon.stop()
    unmount_all_under(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stack(
    own_stack: tuple[Containerd, LazysnapDaemon], registry: Registry, stack_base: Path
) -> Iterator[LazyStack]:
    containerd, daemon = own_stack
    workdir = Path(tempfile.mkdtemp(prefix="mat-", dir=stack_base))
    lazy = LazyStack(containerd, registry, daemon, unique_name("lzs-mat"), workdir)
    yield lazy
    remove_namespace_content(containerd, lazy.namespace)
    shutil.rmtree(workdir, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------


def _status(stack: LazyStack) -> dict[str, object]:
    """`lazysnap status --json` of the daemon's root: what a benchmark polls."""
    out = stack.lazysnap("status", "--root", str(stack.daemon.root), "--json").stdout
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def _layers(stack: LazyStack) -> list[dict[str, object]]:
    layers = _status(stack)["layers"]
    assert isinstance(layers, list)
    return layers


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f}s: {what}")
        time.sleep(0.5)


def _start(stack: LazyStack, reference: str, snapshotter: str = "lazysnap") -> tuple[str, int]:
    """A detached container sleeping; (its id, its init's pid on the host)."""
    name = unique_name("lzs-mat")
    stack.containerd.ctr(
        "run", "-d", "--snapshotter", snapshotter, reference, name, "sleep", "600",
        namespace=stack.namespace,
    )  # fmt: skip
    for line in stack.containerd.ctr("tasks", "ls", namespace=stack.namespace).stdout.split("\n"):
        fields = line.split()
        if fields and fields[0] == name:
            return name, int(fields[1])
    raise AssertionError(f"container {name} has no task")


def _stop(stack: LazyStack, name: str) -> None:
    ns = stack.namespace
    stack.containerd.ctr("tasks", "kill", "-s", "SIGKILL", name, namespace=ns, check=False)
    for _ in range(100):
        if stack.containerd.ctr("tasks", "delete", name, namespace=ns, check=False).returncode == 0:
            break
        time.sleep(0.1)
    stack.containerd.ctr("containers", "rm", name, namespace=ns, check=False)


def _exec(stack: LazyStack, name: str, *command: str) -> str:
    return stack.containerd.ctr(
        "tasks", "exec", "--exec-id", unique_name("x"), name, *command, namespace=stack.namespace
    ).stdout


def _walk_rootfs(pid: int) -> dict[str, dict[str, object]]:
    """Every path of the container's root filesystem, described as tests/lazy/rootfs_walker.py
    does inside pybig, but from the host through /proc/<pid>/root (busybox has no python)."""
    root = f"/proc/{pid}/root"
    skip = set()
    with open(f"/proc/{pid}/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point != "/":
                skip.add(point)
    first_path: dict[tuple[int, int], str] = {}
    found: dict[str, dict[str, object]] = {}
    pending = ["/"]
    while pending:
        top = pending.pop()
        for name in sorted(os.listdir(root + top)):
            inside = os.path.join(top, name)
            if inside in skip:
                continue
            try:
                st = os.lstat(root + inside)
            except FileNotFoundError:
                # A whiteout in a directory only one layer has: overlayfs lists it but finds
                # nothing there (containerd's own unpack shows the same).
                found[inside] = {"path": inside, "listed_but_absent": True}
                continue
            if os.path.isdir(root + inside) and not os.path.islink(root + inside):
                pending.append(inside)
            record = describe(root + inside, st, first_path)
            record["path"] = inside
            if "link_group" in record:
                record["link_group"] = str(record["link_group"]).removeprefix(root)
            found[inside] = record
    return found


def _differences(
    expected: dict[str, dict[str, object]], got: dict[str, dict[str, object]]
) -> list[str]:
    problems = [f"{p}: only in overlayfs" for p in sorted(expected.keys() - got.keys())]
    problems += [f"{p}: only in lazysnap" for p in sorted(got.keys() - expected.keys())]
    for path in sorted(expected.keys() & got.keys()):
        want, have = expected[path], got[path]
        for key in sorted(want.keys() | have.keys()):
            if want.get(key) != have.get(key):
                problems.append(f"{path}: {key} overlayfs={want.get(key)!r} lazy={have.get(key)!r}")
    return problems


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


# -- the test ------------------------------------------------------------------------------------


def test_a_converged_image_runs_from_plain_files_equal_to_containerds_unpack(
    stack: LazyStack,
) -> None:
    data = build_data_image(stack.workdir / "data", {"small": 200_000, "large": 3_000_000})
    built = stack_layer(data.built, stack.workdir / "edge", edge_layer_tar())
    image = stack.push(built, unique_name("test/materialize"))
    stack.index_build(image.reference)
    assert stack.pull(image.reference).lazy == 3
    sums = {path: hashlib.sha256(blob).hexdigest() for path, blob in data.files.items()}

    # A container started while the layers are still on FUSE.
    early, _ = _start(stack, image.reference)
    before = _layers(stack)
    assert len(before) == 3 and all(layer["state"] == "live" for layer in before), (
        f"layers went local before the first container started: {before}"
    )
    mount_pids = [int(str(layer["pid"])) for layer in before]

    _wait_for(lambda: bool(_status(stack)["all_local"]), LOCAL_TIMEOUT_S, "all layers local")
    status = _status(stack)
    assert status["layers_local"] == 3
    # Each layer passed its completion check (diffID and TOC) before it was copied.
    assert [layer["completion_check"] for layer in _layers(stack)] == ["verified"] * 3
    assert status["refused_indexes"] == []
    snapshots = stack.daemon.root / "snapshots"
    assert not [p for p in snapshots.glob("*/fs") if os.path.ismount(p)], "a FUSE mount is left"

    # The early container reads through the detached mounts, whose processes it keeps alive.
    for path, digest in sums.items():
        assert _exec(stack, early, "sha256sum", f"/{path}").split()[0] == digest
    assert _exec(stack, early, "cat", "/etc/motd") == MOTD.decode()
    assert not any(_process_gone(pid) for pid in mount_pids)
    assert all(layer["pid"] in mount_pids for layer in _layers(stack))
    _stop(stack, early)
    _wait_for(
        lambda: all(_process_gone(pid) for pid in mount_pids),
        30,
        f"mount processes {mount_pids} end once no container uses them",
    )
    assert all(layer["pid"] is None for layer in _layers(stack))

    # A new container's rootfs equals containerd's own unpack of the same image.
    stack.ctr_pull(image.reference, snapshotter="overlayfs")
    lazy_name, lazy_pid = _start(stack, image.reference)
    plain_name, plain_pid = _start(stack, image.reference, snapshotter="overlayfs")
    try:
        got, expected = _walk_rootfs(lazy_pid), _walk_rootfs(plain_pid)
    finally:
        _stop(stack, lazy_name)
        _stop(stack, plain_name)
    assert expected["/opt/edge/null"]["rdev"] == [1, 3]  # the edge layer is in both
    assert "/usr/share/doc/README" in expected and "/etc/issue.net" not in expected
    problems = _differences(expected, got)
    assert not problems, "\n".join(problems[:40])
    assert got["/opt/edge/link-b"]["link_group"] == "/opt/edge/link-a"

    # A restart keeps the layers local: no FUSE mount again.
    stack.daemon.restart()
    # containerd's gRPC channel to the proxy snapshotter saw the old daemon go away and
    # reconnects with backoff: a call in the meantime fails ("failed to write client preface:
    # broken pipe"). Wait for containerd to reach the new daemon, as a user's retry would.
    _wait_for(
        lambda: (
            stack.containerd.ctr(
                "snapshots",
                "--snapshotter",
                "lazysnap",
                "ls",
                namespace=stack.namespace,
                check=False,
            ).returncode
            == 0
        ),
        30,
        "containerd reaching the restarted lazysnap daemon",
    )
    assert _status(stack)["all_local"] and not list(snapshots.glob("*/fs.lazysnap.json"))
    assert stack.run_ok(image.reference, "cat", "/etc/motd") == MOTD.decode()
    assert not [p for p in snapshots.glob("*/fs") if os.path.ismount(p)]

    # Removing the image removes the layers: snapshot dirs, copies, markers.
    stack.containerd.ctr("images", "rm", "--sync", image.reference, namespace=stack.namespace)
    _wait_for(lambda: not _layers(stack), 60, "the lazy layers removed with the image")
    assert not [p for p in snapshots.iterdir() if p.name.isdigit()]
    assert not list(snapshots.glob("*/fs.lazysnap-local"))
    assert not list(snapshots.glob("*/fs.lazysnap-bind"))
