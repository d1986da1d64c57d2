"""The completion check through real FUSE mounts and the manager (no containerd): a forged index
is refused once background fetch completes (never materialized, reads fail with EIO, its spans
evicted, the ledger keeps it), a genuine one is verified and materialized."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import forge
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.cache import SpanCache
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import read_state, read_verdict
from tests.fs.fs_helpers import built_index, make_tar, rich_members
from tests.fs.lazy_layers_helpers import (
    background_complete,
    is_local,
    known_mountpoints,
    until_watcher,
)
from tests.fs.manual_clock import ManualClock
from tests.fs.test_fs_mount import Layer

pytestmark = pytest.mark.stack
QUICK = BackgroundSettings(quiet_seconds=0.0)


@pytest.fixture
def clock() -> ManualClock:
    """The daemon side's time: the materializer's watcher polls when a test moves it."""
    return ManualClock()


@pytest.fixture
def manager(tmp_path: Path, clock: ManualClock) -> Iterator[LazyLayers]:
    instance = LazyLayers(
        LazyLayerSettings(
            str(tmp_path / "cache"),
            1 << 30,
            fetch_timeout=5,
            background=QUICK,
            materialize=True,
            materialize_retry_s=3600,
        ),
        clock=clock,
    )
    yield instance
    for mountpoint in known_mountpoints(instance):
        instance.unmount(mountpoint)
    instance.close()


def _wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll what a mount process (another process, on real time) shows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _read_errno(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno or 0
    return 0


def _layer(forgery: Callable[[forge.IndexBlobs], forge.IndexBlobs] | None) -> Layer:
    tar = make_tar(rich_members())
    genuine = forge.IndexBlobs(encode_index(built_index(tar, "tar")))
    chosen = forgery(genuine) if forgery else genuine
    return Layer(tar, tar, chosen.decoded())


def test_a_forged_index_is_refused_and_its_mount_fails_closed(
    manager: LazyLayers, tmp_path: Path, clock: ManualClock
) -> None:
    layer = _layer(lambda genuine: forge.change_mode(genuine, "etc/hosts", 0o4755))
    try:
        mnt = tmp_path / "snapshots" / "1" / "fs"
        mnt.mkdir(parents=True)
        manager.mount_layer(str(mnt), layer.spec())
        # Before the check the forged mode is what the mount serves; the file's pages are now
        # in the kernel's page cache (kept across opens).
        assert os.stat(mnt / "etc/hosts").st_mode & 0o7777 == 0o4755
        assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
        assert _wait_for(lambda: background_complete(mnt)), read_state(str(mnt))
        assert until_watcher(lambda: read_verdict(str(mnt)) is not None, clock)
        verdict = read_verdict(str(mnt))
        assert verdict is not None and verdict.failed
        assert "'etc/hosts': mode is 0o4755 in the index, 0o644 in the tar stream" in (
            verdict.detail
        )
        # Reads fail closed, the kernel's cached pages and attributes included.
        assert _wait_for(lambda: _read_errno(mnt / "etc/hosts") == errno.EIO, 10)
        assert _read_errno(mnt / "usr/lib/big.bin") == errno.EIO
        with pytest.raises(OSError) as listing:
            os.listdir(mnt / "etc")
        assert listing.value.errno == errno.EIO
        assert not is_local(str(mnt))  # never materialized
        assert (read_state(str(mnt)) or {}).get("refused") is True
        # The node refuses the index from now on; its spans are gone from the cache.
        ledger = RefusalLedger(str(tmp_path))
        refused = ledger.refused(forge.IndexBlobs(encode_index(layer.index)).index_digest)
        assert refused is not None and refused.layer_digest == layer.index.layer_digest
        assert ledger.counts() == {"passed": 0, "failed": 1}
        cache = SpanCache(tmp_path / "cache", 1 << 30)
        assert not any(
            cache.contains(layer.index.layer_digest, n) for n in range(len(layer.index.spans))
        )
        with pytest.raises(RemoteLayerUnavailable) as checked:
            manager.check(str(mnt), {})
        assert checked.value.reason is FallbackReason.REFUSED_INDEX
        # A new mount process (the old one killed) starts refused: the verdict file stays.
        spec_copy = tmp_path / "spec.json"
        spec_copy.write_bytes(Path(str(mnt) + ".lazysnap-spec.json").read_bytes())
        pid = int((read_state(str(mnt)) or {})["pid"])
        os.kill(pid, signal.SIGKILL)
        assert _wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10)
        with pytest.raises(RemoteLayerUnavailable) as again:
            manager.mount_layer(str(mnt), layer.spec())
        assert again.value.reason is FallbackReason.REFUSED_INDEX
        # A mount process started on the spec anyway (by hand) reads the verdict and refuses.
        assert read_verdict(str(mnt)) == verdict
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        started = subprocess.Popen(
            [sys.executable, "-m", "snapshotter.fs.mount_process", "--spec", str(spec_copy)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert _wait_for(lambda: os.path.ismount(mnt), 30)
            assert _read_errno(mnt / "etc/hosts") == errno.EIO
        finally:
            started.terminate()
            _, stderr = started.communicate(timeout=30)
        assert b"failed its completion check before: every read gets EIO" in stderr
    finally:
        layer.server.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_genuine_index_is_verified_then_materialized(
    manager: LazyLayers, tmp_path: Path, clock: ManualClock
) -> None:
    layer = _layer(None)
    try:
        mnt = tmp_path / "snapshots" / "1" / "fs"
        mnt.mkdir(parents=True)
        manager.mount_layer(str(mnt), layer.spec())
        assert _wait_for(lambda: background_complete(mnt)), read_state(str(mnt))
        assert until_watcher(lambda: is_local(str(mnt)), clock), read_state(str(mnt))
        verdict = read_verdict(str(mnt))
        assert verdict is not None and not verdict.failed and verdict.diff_id
        assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
        assert RefusalLedger(str(tmp_path)).counts() == {"passed": 1, "failed": 0}
    finally:
        layer.server.stop()


def test_without_a_diff_id_the_layer_is_checked_against_its_toc_and_stays_lazy(
    manager: LazyLayers, tmp_path: Path, caplog: pytest.LogCaptureFixture, clock: ManualClock
) -> None:
    layer = _layer(None)
    try:
        mnt = tmp_path / "snapshots" / "1" / "fs"
        mnt.mkdir(parents=True)
        spec = dataclasses.replace(layer.spec(), diff_id="")  # the image config was not read
        with caplog.at_level(logging.WARNING, logger="lazysnap.fs"):
            manager.mount_layer(str(mnt), spec)
            assert _wait_for(lambda: background_complete(mnt)), read_state(str(mnt))
            assert until_watcher(lambda: "stays lazy: its diffID is unknown" in caplog.text, clock)
        verdict = read_verdict(str(mnt))
        assert verdict is not None and not verdict.failed and not verdict.diff_id
        assert "TOC only" in verdict.detail
        assert not is_local(str(mnt)) and os.path.ismount(mnt)
        assert (mnt / "etc/hosts").read_bytes() == layer.data("etc/hosts")
    finally:
        layer.server.stop()
