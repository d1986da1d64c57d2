"""Starting one mount process: forked by the zygote (`[fuse] zygote`), else plainly.

A plainly started one is `python -m snapshotter.fs.mount_process --spec FILE --ready-fd N` in
its own session (it survives restarts of `lazysnap serve` and their signals), output to the
layer's log. A forked one is the same program after the zygote's fork (fs/zygote.py): ~0.1 s
less per layer. A zygote that fails is restarted once; if that fails too, mount processes are
started plainly from then on, with a log line that says why. A forked process is not the
daemon's child: it is followed through a pidfd (ForkedChild).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from pathlib import Path

from snapshotter.fs import credential_channel
from snapshotter.fs.mount_spec import MOUNT_PROCESS_MODULE
from snapshotter.fs.zygote import ForkedChild, Zygote, ZygoteError
from snapshotter.remote.session_credentials import SessionCredentials

log = logging.getLogger("lazysnap.fs")

# A mount process: the daemon's own child (started plainly) or one forked by the zygote.
MountChild = subprocess.Popen[bytes] | ForkedChild


class MountStarter:
    def __init__(
        self, python: str, *, zygote: bool, session_credentials: SessionCredentials | None = None
    ) -> None:
        self.python = python
        # Pull credentials given with images (the CRI proxy's): each mount process gets those of
        # its layer's repository through a pipe (fs/credential_channel.py), never disk or argv.
        self.session_credentials = session_credentials
        # The zygote forking mount processes; None: start them plainly (off, or given up on).
        self.zygote: Zygote | None = None
        self._lock = threading.Lock()  # held while the zygote is asked, restarted or stopped
        if zygote:
            try:  # now, so that its imports are done by the first lazy Prepare
                self.zygote = Zygote.start(python, MOUNT_PROCESS_MODULE)
            except ZygoteError as exc:
                log.warning("mount-process zygote: %s; starting mount processes plainly", exc)

    def close(self) -> None:
        """Stop the zygote (the mount processes live on, as after the daemon exits)."""
        with self._lock:
            if self.zygote is not None:
                self.zygote.close()
                self.zygote = None

    def start(self, spec_path: Path, ready_fd: int, log_path: Path) -> MountChild:
        """A mount process for spec_path that reports on ready_fd (the caller's to close) and
        appends to log_path. Raises OSError if it cannot be started."""
        creds_fd = credential_channel.open_channel(self.session_credentials, str(spec_path))
        creds_args = [] if creds_fd is None else [credential_channel.ARGUMENT, str(creds_fd)]
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            with open(log_fd, "ab") as log_file:
                return self._fork(
                    spec_path, ready_fd, log_file.fileno(), creds_fd
                ) or subprocess.Popen(
                    [
                        self.python,
                        "-m",
                        MOUNT_PROCESS_MODULE,
                        "--spec",
                        str(spec_path),
                        "--ready-fd",
                        str(ready_fd),
                        *creds_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(ready_fd,) if creds_fd is None else (ready_fd, creds_fd),
                    start_new_session=True,  # survives serve restarts and its signals
                    cwd="/",
                )
        finally:
            if creds_fd is not None:
                os.close(creds_fd)

    def _fork(
        self, spec_path: Path, ready_fd: int, log_fd: int, creds_fd: int | None
    ) -> ForkedChild | None:
        """A mount process forked by the zygote, or None: start one plainly. A zygote that fails
        is restarted once; if the new one fails too, the zygote is given up on for good."""
        with self._lock:
            zygote = self.zygote
            if zygote is None:
                return None
            try:
                return zygote.fork(str(spec_path), ready_fd, log_fd, creds_fd)
            except ZygoteError as exc:
                log.warning(
                    "mount-process zygote (pid %d) failed: %s; starting a new one", zygote.pid, exc
                )
            zygote.close()
            self.zygote = None
            fresh: Zygote | None = None
            try:
                fresh = Zygote.start(self.python, MOUNT_PROCESS_MODULE)
                child = fresh.fork(str(spec_path), ready_fd, log_fd, creds_fd)
            except ZygoteError as exc:
                log.warning(
                    "mount-process zygote failed again (%s): starting mount processes plainly "
                    "from now on (~0.1 s more per lazy layer)",
                    exc,
                )
                if fresh is not None:
                    fresh.close()
                return None
            self.zygote = fresh
            return child


def signal_child(pid: int, child: MountChild | None, signum: int) -> None:
    if isinstance(child, ForkedChild):
        child.send_signal(signum)  # through its pidfd: never a process that reused the pid
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def death_note(child: MountChild) -> str:
    """How a mount process ended, as far as the daemon can tell."""
    if isinstance(child, ForkedChild):
        return " (the zygote logs its exit status)"
    status = child.poll()
    if status is None:
        return ""
    return f" (killed by signal {-status})" if status < 0 else f" (exit status {status})"


def exit_note(child: MountChild) -> str:
    if isinstance(child, ForkedChild):
        return " (its status is in the daemon's log)"
    return f" ({child.poll()})"


def close_child(child: MountChild | None) -> None:
    """Release what follows a forked child (its pidfd); nothing for a plain one."""
    if isinstance(child, ForkedChild):
        child.close()
