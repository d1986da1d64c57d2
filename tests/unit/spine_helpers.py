"""Start the real `lazysnap serve` as a process and talk to it (used by the spine's tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.core.mounts import mount_points_under

NAMESPACE = "unit-tests"


@dataclass
class DaemonProcess:
    root: Path
    address: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    _channel: Any = None

    @property
    def stub(self) -> Any:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.address}")
        return snapshots_pb2_grpc.SnapshotsStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.close_channel()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def serve_command(root: Path, address: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snapshotter.cli",
        "serve",
        "--root",
        str(root),
        "--address",
        str(address),
        *extra,
    ]


def start_daemon(
    root: Path, address: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> DaemonProcess:
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            serve_command(root, address, *extra), stderr=log, stdout=log, env=full_env
        )
    daemon = DaemonProcess(root, address, log_path, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {daemon.log}")
        if address.exists():
            channel = grpc.insecure_channel(f"unix://{address}")
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
                return daemon
            except grpc.FutureTimeoutError:
                pass
            finally:
                channel.close()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"daemon did not come up: {daemon.log}")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temp dir; any mount a test left under it is detached before it is deleted."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
        for point in mount_points_under(tmp):
            subprocess.run(["umount", "-l", point], check=False)


def kill_all(daemons: list[DaemonProcess]) -> None:
    """Close the channel of, and kill, every daemon a test started (idempotent)."""
    for daemon in daemons:
        daemon.close_channel()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
