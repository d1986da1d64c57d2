"""scripts/install-node.sh parses (bash -n: the whole file, also the parts only a full install
runs), refuses bad arguments with a message naming them, before it changes anything, and an
uninstall of nothing succeeds and leaves nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install-node.sh"


def install_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALLER), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_the_script_parses() -> None:
    checked = subprocess.run(
        ["bash", "-n", str(INSTALLER)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--purge"], "--purge goes with --uninstall"),
        (["--uninstall", "--postgres"], "--postgres goes with an install"),
        (["--prefix", "relative/dir"], "--prefix must be an absolute path"),
        (["--prefix", "/tmp/with space"], "got '/tmp/with space'"),
        (["--python", "/nonexistent/python3"], "--python /nonexistent/python3: no such"),
        (["--frobnicate"], "unknown argument --frobnicate"),
    ],
)
def test_bad_arguments_are_named_and_nothing_is_written(
    tmp_path: Path, args: list[str], message: str
) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    if "--prefix" not in args:
        args = ["--prefix", str(prefix), *args]
    result = install_node(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert list(prefix.iterdir()) == []


def test_uninstalling_what_is_not_installed_succeeds(tmp_path: Path) -> None:
    result = install_node("--prefix", str(tmp_path), "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert "removed lazysnap" in result.stdout
    assert list(tmp_path.iterdir()) == []
