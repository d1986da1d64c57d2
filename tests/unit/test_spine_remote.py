"""The remote-layer path of the core, against a fake RemoteLayers (the interface exists for this).

The fake "mounts" a layer by bind-mounting a directory with the layer's files, so the snapshots
it produces can be used as real overlay lower dirs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from snapshotter.core.errors import AlreadyExists, FailedPrecondition, NotFound
from snapshotter.core.fallbacks import DEFAULT_CAPACITY, find_fallback, read_fallbacks
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.core.metadata import Kind
from snapshotter.core.mounts import mount_points_under
from snapshotter.core.outcomes import PreparedLayer, PrepareOutcome
from snapshotter.core.snapshotter import Info, Snapshotter
from snapshotter.vocabulary.labels import REMOTE_LABEL

LAYER_DIGEST = "sha256:" + "ab" * 32
TARGET = "ns/1/sha256:" + "cd" * 32


def is_mounted(path: str) -> bool:
    # os.path.ismount misses bind mounts within one filesystem; the mount table does not.
    return os.path.realpath(path) in mount_points_under(path)


class FakeRemoteLayers:
    def __init__(self, content: Path, fail_with: str | None = None) -> None:
        self.content = content
        self.fail_with = fail_with
        self.fail_reason = FallbackReason.NO_INDEX
        self.mounted: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self.block: threading.Event | None = None  # mount waits for it when set
        self.raise_unexpected = False
        # The next this many mounts return (as the real manager does once its mount process
        # is started) but the process then fails: check() reports it.
        self.broken_starts = 0
        self.failed_starts: set[str] = set()
        self.fail_for: dict[str, str] = {}  # target snapshot -> why its layer falls back

    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        self.calls.append(("mount", mountpoint))
        if self.block is not None:
            assert self.block.wait(10)
        if self.raise_unexpected:
            raise KeyError("bug in the lazy layer")
        if self.fail_with is not None:
            raise RemoteLayerUnavailable(self.fail_with, self.fail_reason)
        if labels.get("containerd.io/snapshot.ref", "") in self.fail_for:
            raise RemoteLayerUnavailable(self.fail_for[labels["containerd.io/snapshot.ref"]])
        if self.broken_starts > 0:
            self.broken_starts -= 1
            self.failed_starts.add(mountpoint)
            return
        subprocess.run(["mount", "--bind", str(self.content), mountpoint], check=True)
        self.mounted[mountpoint] = dict(labels)

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        self.calls.append(("check", mountpoint))
        if mountpoint in self.failed_starts:
            self.failed_starts.discard(mountpoint)
            raise RemoteLayerUnavailable("mount process exited (1) before it was ready")
        if not is_mounted(mountpoint) or mountpoint not in self.mounted:
            raise RemoteLayerUnavailable("not mounted")

    def unmount(self, mountpoint: str) -> None:
        self.calls.append(("unmount", mountpoint))
        if is_mounted(mountpoint):
            subprocess.run(["umount", mountpoint], check=True)
        self.mounted.pop(mountpoint, None)


@pytest.fixture
def layer_content(root: Path) -> Iterator[Path]:
    content = root.parent / (root.name + "-layer")
    content.mkdir()
    (content / "from-remote").write_text("lazy bytes")
    yield content
    subprocess.run(["rm", "-rf", str(content)], check=True)


@pytest.fixture
def remote(layer_content: Path) -> FakeRemoteLayers:
    return FakeRemoteLayers(layer_content)


@pytest.fixture
def core(root: Path, remote: FakeRemoteLayers) -> Iterator[Snapshotter]:
    sn = Snapshotter(str(root / "state"), remote=remote)
    yield sn
    for mountpoint in list(remote.mounted):
        remote.unmount(mountpoint)
    sn.close()


def layer_labels(**extra: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": TARGET,
        "containerd.io/snapshot/cri.layer-digest": LAYER_DIGEST,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/test/busybox:latest",
        **extra,
    }


def fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "falls back to a full pull" in r.getMessage()]


def test_a_mounted_layer_is_committed_as_the_target_and_reported_as_existing(
    core: Snapshotter, remote: FakeRemoteLayers, root: Path
) -> None:
    with pytest.raises(AlreadyExists, match="target snapshot"):
        core.prepare("ns/1/extract-1 sha256:x", "", layer_labels())
    info = core.stat(TARGET)
    assert info.kind is Kind.COMMITTED
    assert info.labels == {**layer_labels(), REMOTE_LABEL: "remote"}
    with pytest.raises(NotFound):
        core.stat("ns/1/extract-1 sha256:x")
    [(call, mountpoint)] = remote.calls
    assert call == "mount"
    assert Path(mountpoint).parent.parent == root / "state" / "snapshots"
    assert Path(mountpoint).name == "fs"

    # A container on top sees the lazy layer's files through overlayfs.
    [mount] = core.prepare("container", TARGET)
    assert f"lowerdir={mountpoint}" in mount.options
    target = root / "rootfs"
    target.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "-o", ",".join(mount.options), "overlay", str(target)],
        check=True,
    )
    try:
        assert (target / "from-remote").read_text() == "lazy bytes"
    finally:
        subprocess.run(["umount", str(target)], check=True)

    # Removing it unmounts the layer before its directory goes.
    core.remove("container")
    core.remove(TARGET)
    assert remote.calls[-1] == ("unmount", mountpoint)
    assert not is_mounted(mountpoint)
    assert not Path(mountpoint).exists()


def test_an_unavailable_layer_falls_back_with_exactly_one_log_line(
    core: Snapshotter, remote: FakeRemoteLayers, caplog: pytest.LogCaptureFixture
) -> None:
    remote.fail_with = "no index for this layer in the registry"
    caplog.set_level(logging.DEBUG, logger="lazysnap")
    [mount] = core.prepare("extract-1", "", layer_labels())
    assert mount.type == "bind" and mount.options == ("rw", "rbind")
    assert core.stat("extract-1").kind is Kind.ACTIVE
    with pytest.raises(NotFound):
        core.stat(TARGET)
    assert fallback_lines(caplog) == [
        f"layer {LAYER_DIGEST} falls back to a full pull: no_index: "
        "no index for this layer in the registry"
    ]
    # The ordinary snapshot works as usual: containerd unpacks into it and commits.
    Path(mount.source, "unpacked").write_text("tar contents")
    core.commit(TARGET, "extract-1")
    assert REMOTE_LABEL not in core.stat(TARGET).labels


def test_the_observer_is_told_each_prepare_outcome_with_its_reason(
    root: Path, remote: FakeRemoteLayers
) -> None:
    """What the metrics learn from the core: lazy (with where it is mounted), fallback with the
    reason the failure carried (internal_error for a bug), ordinary; a Prepare that finds its
    target already there, or fails, tells nothing."""
    told: list[tuple[str, PrepareOutcome, FallbackReason | None, str]] = []

    def observer(
        layer: PreparedLayer, outcome: PrepareOutcome, reason: FallbackReason | None
    ) -> None:
        told.append((layer.key, outcome, reason, layer.mountpoint))

    sn = Snapshotter(str(root / "state"), remote=remote, observer=observer)
    try:
        with pytest.raises(AlreadyExists):
            sn.prepare("extract-1", "", layer_labels())
        [(key, outcome, reason, mountpoint)] = told
        assert (key, outcome, reason) == ("extract-1", PrepareOutcome.LAZY, None)
        assert mountpoint in remote.mounted
        with pytest.raises(AlreadyExists):  # the target is there: no new outcome
            sn.prepare("extract-2", "", layer_labels())
        remote.fail_with, remote.fail_reason = "registry says no", FallbackReason.REGISTRY
        sn.prepare("extract-3", "", layer_labels(**{"containerd.io/snapshot.ref": "other"}))
        remote.fail_with, remote.raise_unexpected = None, True
        sn.prepare("extract-4", "", layer_labels(**{"containerd.io/snapshot.ref": "third"}))
        sn.prepare("container", TARGET)
        with pytest.raises(NotFound):  # a failed Prepare: no outcome
            sn.prepare("orphan", "missing-parent")
        assert [(key, outcome, reason) for key, outcome, reason, _ in told[1:]] == [
            ("extract-3", PrepareOutcome.FALLBACK, FallbackReason.REGISTRY),
            ("extract-4", PrepareOutcome.FALLBACK, FallbackReason.INTERNAL_ERROR),
            ("container", PrepareOutcome.ORDINARY, None),
        ]
    finally:
        for mountpoint in list(remote.mounted):
            remote.unmount(mountpoint)
        sn.close()


def test_why_a_layer_fell_back_is_kept_on_disk_for_other_processes(
    core: Snapshotter, remote: FakeRemoteLayers, root: Path
) -> None:
    """`lazysnap pull` in its own process finds its Prepare's reason by the key it sent
    (containerd prefixes it with namespace and id); `lazysnap status` reads them all."""
    remote.fail_with = "registry says no"
    remote.fail_reason = FallbackReason.REGISTRY
    core.prepare("k8s.io/7/extract-1 sha256:x", "", layer_labels())
    state = str(root / "state")
    found = find_fallback(state, "extract-1 sha256:x")
    assert found is not None
    assert (found.reason, found.message, found.layer_digest) == (
        "registry",
        "registry says no",
        LAYER_DIGEST,
    )
    assert found.summary == "registry: registry says no"
    assert find_fallback(state, "extract-2 sha256:x") is None
    # Mounted lazily later: the old reason no longer describes the layer.
    remote.fail_with = None
    with pytest.raises(AlreadyExists):
        core.prepare("k8s.io/8/extract-2 sha256:x", "", layer_labels())
    assert read_fallbacks(state) == []


def test_the_fallback_record_is_bounded_and_survives_a_restart(
    core: Snapshotter, remote: FakeRemoteLayers, root: Path
) -> None:
    remote.fail_with = "x" * 10_000
    for n in range(DEFAULT_CAPACITY + 5):
        labels = layer_labels(**{"containerd.io/snapshot.ref": f"{TARGET}-{n}"})
        core.prepare(f"extract-{n}", "", labels)
    entries = read_fallbacks(str(root / "state"))
    assert len(entries) == DEFAULT_CAPACITY
    assert entries[0].key == "extract-5" and entries[-1].key == f"extract-{DEFAULT_CAPACITY + 4}"
    assert all(len(e.message) <= 2000 for e in entries)
    reopened = Snapshotter(str(root / "state"), remote=remote)
    try:
        assert reopened.fallbacks.entries() == entries
    finally:
        reopened.close()


def test_a_daemon_without_lazy_layers_records_why_for_a_lazy_request(root: Path) -> None:
    sn = Snapshotter(str(root / "plain"), remote=None)
    try:
        sn.prepare("extract-1", "", layer_labels())
        found = sn.fallbacks.find("extract-1")
        assert found is not None and found.reason == "disabled", found
        sn.prepare("plain-2", "", {})  # an ordinary Prepare asks for nothing lazy
        assert sn.fallbacks.find("plain-2") is None
    finally:
        sn.close()


def test_a_crashing_remote_implementation_also_falls_back(
    core: Snapshotter, remote: FakeRemoteLayers, caplog: pytest.LogCaptureFixture
) -> None:
    remote.raise_unexpected = True
    [mount] = core.prepare("extract-1", "", layer_labels())
    assert mount.type == "bind"
    [line] = fallback_lines(caplog)
    assert "KeyError" in line and LAYER_DIGEST in line and "internal_error" in line


def test_an_existing_target_answers_already_exists_without_mounting(
    core: Snapshotter, remote: FakeRemoteLayers
) -> None:
    core.prepare("unpacked-before")
    core.commit(TARGET, "unpacked-before")
    with pytest.raises(AlreadyExists, match="target snapshot"):
        core.prepare("extract-2", "", layer_labels())
    assert remote.calls == []


def test_only_prepare_with_a_target_label_goes_remote(
    core: Snapshotter, remote: FakeRemoteLayers
) -> None:
    core.prepare("plain", "", {"containerd.io/snapshot/cri.layer-digest": LAYER_DIGEST})
    core.view("view", "", layer_labels())
    assert remote.calls == []


def test_update_keeps_the_remote_label(core: Snapshotter) -> None:
    with pytest.raises(AlreadyExists):
        core.prepare("extract-1", "", layer_labels())
    info = core.update(Info(name=TARGET, labels={"containerd.io/gc.root": "x"}))
    assert info.labels == {"containerd.io/gc.root": "x", REMOTE_LABEL: "remote"}


def test_cleanup_leaves_a_layer_that_is_being_mounted_alone(
    core: Snapshotter, remote: FakeRemoteLayers, root: Path
) -> None:
    remote.block = threading.Event()
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            core.prepare("extract-1", "", layer_labels())
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=prepare)
    worker.start()
    try:
        for _ in range(200):
            if remote.calls:
                break
            threading.Event().wait(0.01)
        [(_, mountpoint)] = remote.calls
        # Other operations are not blocked by a slow mount, and Cleanup skips its directory.
        core.prepare("other")
        core.cleanup()
        assert Path(mountpoint).is_dir()
    finally:
        remote.block.set()
        worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], AlreadyExists)
    assert core.stat(TARGET).kind is Kind.COMMITTED
    assert is_mounted(mountpoint)


def test_restart_checks_remote_snapshots_and_mounts_lost_ones_again(
    root: Path, layer_content: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_remote = FakeRemoteLayers(layer_content)
    first = Snapshotter(str(root / "state"), remote=first_remote)
    with pytest.raises(AlreadyExists):
        first.prepare("extract-1", "", layer_labels())
    [mountpoint] = first_remote.mounted
    first.close()
    first_remote.unmount(mountpoint)  # the mount died with the old daemon

    caplog.set_level(logging.INFO, logger="lazysnap")
    second_remote = FakeRemoteLayers(layer_content)
    second = Snapshotter(str(root / "state"), remote=second_remote)
    try:
        second.restore_remote_snapshots()
        assert second_remote.calls == [
            ("check", mountpoint),
            ("mount", mountpoint),
            ("check", mountpoint),  # the mounts start together, then each is waited for
        ]
        assert is_mounted(mountpoint)
        assert any("mounted again" in r.getMessage() for r in caplog.records)
    finally:
        second_remote.unmount(mountpoint)
        second.close()

    broken_remote = FakeRemoteLayers(layer_content, fail_with="registry unreachable")
    third = Snapshotter(str(root / "state"), remote=broken_remote)
    try:
        third.restore_remote_snapshots()
    finally:
        third.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "registry unreachable" in errors[0] and TARGET in errors[0]


def lazy_layer_mountpoint(core: Snapshotter, remote: FakeRemoteLayers) -> str:
    with pytest.raises(AlreadyExists):
        core.prepare("extract-1", "", layer_labels())
    [(call, mountpoint)] = remote.calls
    assert call == "mount"
    return mountpoint


def test_a_layer_whose_mount_fails_after_prepare_answered_is_mounted_again_before_use(
    core: Snapshotter, remote: FakeRemoteLayers, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote.broken_starts = 1
    mountpoint = lazy_layer_mountpoint(core, remote)  # answered before the mount was ready
    [mount] = core.prepare("container", TARGET)
    assert remote.calls[1:] == [("check", mountpoint), ("mount", mountpoint), ("check", mountpoint)]
    assert any("mounting it again" in r.getMessage() for r in caplog.records)
    target = root / "rootfs"
    target.mkdir()
    options = ",".join(mount.options)
    subprocess.run(["mount", "-t", mount.type, "-o", options, "overlay", str(target)], check=True)
    try:
        assert (target / "from-remote").read_text() == "lazy bytes"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_lazy_layer_that_cannot_be_mounted_fails_its_users_naming_it(
    core: Snapshotter, remote: FakeRemoteLayers
) -> None:
    remote.broken_starts = 2  # the first mount and the retry both fail
    lazy_layer_mountpoint(core, remote)
    with pytest.raises(FailedPrecondition, match=f"lazy layer {LAYER_DIGEST}.*cannot be mounted"):
        core.prepare("container", TARGET)
    with pytest.raises(NotFound):  # nothing half-made: no container snapshot without its layer
        core.stat("container")
    assert [info.name for info in core.list()] == [TARGET]
    # The layer is not given up: the next use tries again, and the mount now works.
    core.view("view", TARGET)
    assert is_mounted(remote.calls[-1][1])


def test_mounts_of_a_container_remount_a_lazy_layer_that_died_or_fail_clearly(
    core: Snapshotter, remote: FakeRemoteLayers
) -> None:
    mountpoint = lazy_layer_mountpoint(core, remote)
    core.prepare("container", TARGET)
    remote.unmount(mountpoint)  # the mount process died
    remote.fail_with = "registry unreachable"
    with pytest.raises(FailedPrecondition, match="registry unreachable"):
        core.mounts("container")
    remote.fail_with = None
    [mount] = core.mounts("container")
    assert f"lowerdir={mountpoint}" in mount.options
    assert is_mounted(mountpoint)


def test_a_layer_pulled_whole_on_top_of_a_lazy_one_waits_for_it(
    core: Snapshotter, remote: FakeRemoteLayers
) -> None:
    remote.broken_starts = 1
    mountpoint = lazy_layer_mountpoint(core, remote)
    child_target = "ns/1/sha256:" + "ef" * 32
    remote.fail_for[child_target] = "no index for this layer"
    child = layer_labels(**{"containerd.io/snapshot.ref": child_target})
    # containerd unpacks the child's tar onto these mounts: its lazy parent must be there.
    [mount] = core.prepare("extract-2", TARGET, child)
    assert mount.type == "overlay" and f"lowerdir={mountpoint}" in mount.options
    assert is_mounted(mountpoint)

    remote.unmount(mountpoint)  # the parent's mount process died, and the registry is gone
    remote.fail_for[TARGET] = "registry unreachable"
    other = layer_labels(**{"containerd.io/snapshot.ref": "ns/1/sha256:" + "01" * 32})
    remote.fail_for[other["containerd.io/snapshot.ref"]] = "no index for this layer"
    with pytest.raises(FailedPrecondition, match="registry unreachable"):
        core.prepare("extract-3", TARGET, other)
    with pytest.raises(NotFound):
        core.stat("extract-3")
