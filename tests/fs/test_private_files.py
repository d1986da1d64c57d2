"""The daemon's and mount processes' own files are private whatever the umask, and a replaced
file is never seen half written (snapshotter/private_files.py, used by state, spec, index
sidecars, the local marker and the completion-check ledger)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.lazylayers.refusals import RefusalLedger, RefusedIndex
from snapshotter.private_files import replace_private, write_private


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    old = os.umask(0o000)  # the worst case: without the explicit mode files would be 0666
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_0600_whatever_the_umask_and_an_existing_mode(tmp_path: Path) -> None:
    existing = tmp_path / "state.json"
    existing.write_text("old")
    existing.chmod(0o644)
    write_private(existing, b"new")
    assert existing.read_bytes() == b"new" and _mode(existing) == 0o600
    for durable in (False, True):
        replaced = tmp_path / f"marker-{durable}"
        replaced.write_text("old")
        replaced.chmod(0o666)
        replace_private(replaced, b"x" * 100_000, durable=durable)
        assert replaced.read_bytes() == b"x" * 100_000 and _mode(replaced) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "marker-False",
        "marker-True",
        "state.json",
    ]  # no temp file left behind


def test_a_failed_replace_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("old")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OSError):
        replace_private(tmp_path / "sub", b"new")  # renaming a file over a directory fails
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "sub"]


def test_the_completion_ledger_is_private(tmp_path: Path) -> None:
    ledger = RefusalLedger(str(tmp_path))
    ledger.record_refusal(RefusedIndex("sha256:" + "a" * 64, "sha256:" + "b" * 64, "mode differs"))
    written = {p.name: _mode(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert "completion-ledger.json" in written  # and its lock file beside it
    assert set(written.values()) == {0o600}, written
