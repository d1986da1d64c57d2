"""Start the real `lazysnap serve` as a process and talk to it (used by the spine's tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc

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
