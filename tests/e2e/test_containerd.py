"""containerd pulls an image from the local registry and runs it with runc, through lazysnap
and, for comparison, through its built-in overlayfs snapshotter."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from harness.containerd import Containerd
from harness.daemon import LazysnapDaemon
from harness.images import PushedImage, build_busybox, push
from harness.procs import HarnessError
from harness.registry import Registry

pytestmark = pytest.mark.stack


def test_busybox_runs_on_builtin_overlayfs(
    containerd: Containerd, busybox_image: PushedImage
) -> None:
    containerd.pull(busybox_image.reference, snapshotter="overlayfs")
    output = containerd.run_container(
        busybox_image.reference,
        "echo",
        "hello",
        snapshotter="overlayfs",
        container_id=f"ovl-{secrets.token_hex(4)}",
    )
    assert output == "hello\n"


def test_busybox_runs_on_lazysnap(
    lazysnap: LazysnapDaemon, containerd: Containerd, busybox_image: PushedImage
) -> None:
    containerd.pull(busybox_image.reference, snapshotter="lazysnap")
    output = containerd.run_container(
        busybox_image.reference,
        "echo",
        "hello",
        snapshotter="lazysnap",
        container_id=f"lzs-{secrets.token_hex(4)}",
    )
    assert output == "hello\n"
    snapshots = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout
    # The image's one layer was committed by lazysnap (a line per snapshot after the header).
    assert len(snapshots.strip().splitlines()) >= 2, snapshots


def test_container_sees_image_files_and_writes_stay_private(
    lazysnap: LazysnapDaemon, containerd: Containerd, busybox_image: PushedImage
) -> None:
    containerd.pull(busybox_image.reference, snapshotter="lazysnap")
    first = containerd.run_container(
        busybox_image.reference,
        "sh",
        "-c",
        "cat /etc/passwd | head -n1; echo x > /etc/marker",
        snapshotter="lazysnap",
    )
    assert first.splitlines()[0].startswith("root:x:0:0:")
    second = containerd.run_container(
        busybox_image.reference,
        "sh",
        "-c",
        "test -e /etc/marker && echo leaked || echo clean",
        snapshotter="lazysnap",
    )
    assert second == "clean\n"


def test_zstd_layers_run_on_lazysnap(
    lazysnap: LazysnapDaemon, containerd: Containerd, registry: Registry, tmp_path: Path
) -> None:
    built = build_busybox(tmp_path / "busybox-zstd", compression="zstd")
    assert built.layers[0].media_type.endswith("tar+zstd")
    image = push(built, registry.host, "test/busybox-zstd", "latest")
    containerd.pull(image.reference, snapshotter="lazysnap")
    output = containerd.run_container(image.reference, "cat", "/etc/group", snapshotter="lazysnap")
    assert output.startswith("root:x:0:\n")


def test_pulled_image_still_runs_after_daemon_kill_and_restart(
    lazysnap: LazysnapDaemon, containerd: Containerd, busybox_image: PushedImage
) -> None:
    containerd.pull(busybox_image.reference, snapshotter="lazysnap")
    lazysnap.kill()
    lazysnap.start()
    # containerd's gRPC connection to the proxy died with the daemon and redials with backoff
    # (~1 s), so the first calls may fail with "unavailable"; the image must work again soon.
    deadline = time.monotonic() + 15
    while True:
        try:
            output = containerd.run_container(
                busybox_image.reference, "echo", "survived", snapshotter="lazysnap"
            )
            break
        except HarnessError as exc:
            if "unavailable" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert output == "survived\n"
    assert lazysnap.stop() == 0  # a clean SIGTERM exit after recovering from the crash
    lazysnap.start()
