"""`lazysnap status` as a user runs it: errors, an idle root, and a daemon coming and going."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.spine_helpers import DaemonProcess, start_daemon


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_missing_root_is_a_clear_error(workdir: Path) -> None:
    missing = workdir / "no-such-root"
    result = status("--root", str(missing))
    assert result.returncode == 1
    assert (
        result.stderr == f"error: lazysnap root {missing} does not exist (or is not a directory)\n"
    )
    assert result.stdout == ""
    assert not missing.exists()


def test_a_bad_config_names_the_file_and_key(workdir: Path) -> None:
    config = workdir / "config.toml"
    config.write_text("[cache]\nmax_size_bytes = 'big'\n")
    result = status("--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr and "cache.max_size_bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_idle_root_has_no_layers_and_status_writes_nothing(workdir: Path) -> None:
    root = workdir / "root"
    root.mkdir()
    result = status("--root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["root"] == str(root)
    assert report["layers"] == []
    assert report["daemon"] == {"lock_path": str(root / "lock"), "pid": None, "running": False}
    assert report["cache"]["dir"] == str(root / "cache")
    assert (report["cache"]["bytes"], report["cache"]["spans"]) == (0, 0)
    assert list(root.iterdir()) == []  # a read-only look: no cache dir, no lock file

    table = status("--root", str(root))
    assert table.returncode == 0
    assert "daemon  not running\n" in table.stdout
    assert "no lazily mounted layers" in table.stdout


def test_the_daemon_is_shown_running_then_stopped(
    workdir: Path, daemons: list[DaemonProcess]
) -> None:
    config = workdir / "config.toml"
    config.write_text("[remote]\nenable = false\n[cache]\nmax_size_bytes = 1048576\n")
    root = workdir / "root"
    daemon = start_daemon(
        root, workdir / "lazysnap.sock", workdir / "daemon.log", "--config", str(config)
    )
    daemons.append(daemon)

    running = json.loads(status("--config", str(config), "--root", str(root), "--json").stdout)
    assert running["daemon"]["running"] is True
    assert running["daemon"]["pid"] == daemon.proc.pid
    assert running["cache"]["max_bytes"] == 1048576  # read from the config file
    assert daemon.proc.poll() is None  # looking did not disturb it

    assert daemon.stop() == 0
    table = status("--root", str(root))
    assert f"daemon  not running (last pid {daemon.proc.pid})" in table.stdout
