"""Fixtures for the spine's unit tests: a core on a temp root, and the real daemon as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.spine_helpers import DaemonProcess, kill_all, scratch_dir, start_daemon


@pytest.fixture
def root() -> Iterator[Path]:
    """A temp root; any mount a test left under it is detached before it is deleted."""
    with scratch_dir("lazysnap-unit-") as path:
        yield path


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    with scratch_dir("lazysnap-daemon-") as path:
        yield path


@pytest.fixture
def daemons(daemon_dir: Path) -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts goes in this list and is killed at the end."""
    started: list[DaemonProcess] = []
    yield started
    kill_all(started)


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
