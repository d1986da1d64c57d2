"""Fixtures for `lazysnap status` and the metrics tests: a temp dir that is unmounted and deleted
afterwards, and a list of daemons that are all stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.spine_helpers import DaemonProcess, kill_all, scratch_dir


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir("lazysnap-status-") as path:
        yield path


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts goes in this list and is killed at the end."""
    started: list[DaemonProcess] = []
    yield started
    kill_all(started)
