"""Fixtures for the spine's unit tests: a core on a temp root, and the real daemon as a process."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.core.mounts import mount_points_under
from tests.unit.spine_helpers import DaemonProcess, start_daemon


@pytest.fixture
def root() -> Iterator[Path]:
    """A temp root; any mount a test left under it is detached before it is deleted."""
    with tempfile.TemporaryDirectory(prefix="lazysnap-unit-") as tmp:
        yield Path(tmp)
        for point in mount_points_under(tmp):
            subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lazysnap-daemon-") as tmp:
        yield Path(tmp)
        for point in mount_points_under(tmp):
            subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def daemons(daemon_dir: Path) -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts goes in this list and is killed at the end."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close_channel()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


@pytest.fixture
def daemon(daemon_dir: Path, daemons: list[DaemonProcess]) -> DaemonProcess:
    # Remote layers off: these tests are about the spine, not about snapshotter.fs.
    config = daemon_dir / "config.toml"
    config.write_text("[remote]\nenable = false\n")
    started = start_daemon(
        daemon_dir / "root",
        daemon_dir / "lazysnap.sock",
        daemon_dir / "daemon.log",
        "--config",
        str(config),
        "--log-level",
        "debug",
    )
    daemons.append(started)
    return started
