"""Fixtures for `lazysnap status` and the metrics tests: a temp dir that is unmounted and deleted
afterwards, and a list of daemons that are all stopped at the end."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.core.mounts import mount_points_under
from tests.unit.spine_helpers import DaemonProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lazysnap-status-") as tmp:
        yield Path(tmp)
        for point in mount_points_under(tmp):
            subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts goes in this list and is killed at the end."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.close_channel()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
