"""Starting, waiting for and stopping the background programs the harness runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class HarnessError(Exception):
    """A harness step failed; the message names the program and quotes its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        # A zombie still answers kill(0); treat it as gone (state Z in /proc).
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def unix_socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


@dataclass
class Service:
    """One background program: its pid, and the file its stdout+stderr go to."""

    name: str
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ready() until true; fail early, with the log, if the program dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive():
                raise HarnessError(
                    f"{self.name} exited (rc={self.returncode()}) before {what}; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)
        raise HarnessError(
            f"{self.name} not ready ({what}) after {timeout:.0f} s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 20.0, signum: int = signal.SIGTERM) -> int | None:
        """Signal, wait for the pid to be gone (a restart must not race the old process),
        SIGKILL after timeout. Returns the exit code when we are the parent, else None."""
        if self.alive():
            self.send_signal(signum)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            self.send_signal(signal.SIGKILL)
            while self.alive():
                time.sleep(0.05)
        return self.returncode()


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start argv in its own session (a Ctrl-C of pytest must not hit it before our orderly
    stop), with stdout+stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise HarnessError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    return Service(name=name, pid=popen.pid, log_path=log_path, popen=popen)


def run(
    argv: Sequence[str], what: str, timeout: float = 120.0, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise HarnessError quoting its stderr."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise HarnessError(f"{what}: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what}: {' '.join(argv)} timed out after {timeout:.0f} s") from exc
    if result.returncode != 0:
        raise HarnessError(
            f"{what}: `{' '.join(argv)}` failed (rc={result.returncode}):\n"
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below base, deepest first (the order they must be unmounted in)."""
    prefix = str(base.resolve())
    found: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_all_under(base: Path) -> list[str]:
    """Lazy-unmount everything below base (overlay, bind, FUSE); returns what was unmounted."""
    done: list[str] = []
    for _ in range(5):  # stacked mounts on one point need several passes
        points = mounts_under(base)
        if not points:
            break
        for point in points:
            result = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            if result.returncode != 0 and Path("/usr/bin/fusermount3").exists():
                subprocess.run(["fusermount3", "-uz", point], capture_output=True, text=True)
            done.append(point)
    return done
