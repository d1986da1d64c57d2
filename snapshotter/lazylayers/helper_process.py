"""A background helper process the daemon can cancel from another thread: the completion check
(completion.py) and the copy to plain files (copy_helper.py) each run one. It starts in a
session of its own, so cancel() ends it together with whatever it started (cp), from `/`, with
its output collected."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from dataclasses import dataclass

STOP_TIMEOUT_S = 10.0


class HelperCancelled(Exception):
    """cancel() came before or while the helper ran."""


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes  # empty unless asked for
    stderr: bytes

    def last_error_line(self) -> str:
        lines = self.stderr.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"helper exited {self.returncode}"


class CancellableProcess:
    def __init__(self) -> None:
        self.cancelled = False
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def run(self, command: list[str], *, stdout: bool = False) -> Finished:
        """Run command to its end. OSError if it cannot start; HelperCancelled if cancel()
        came first or meanwhile (its result then means nothing)."""
        with self._lock:
            if self.cancelled:
                raise HelperCancelled
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd="/",
            )
            self._child = child
        out, err = child.communicate()
        if self.cancelled:
            raise HelperCancelled
        return Finished(child.returncode, out or b"", err or b"")

    def cancel(self) -> None:
        """End the helper and everything in its session, and wait for it."""
        with self._lock:
            self.cancelled = True
            child = self._child
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(STOP_TIMEOUT_S)
