"""What the kernel and /proc say about one lazy mount: is it live, is its process still the
mount process it was (not a reused pid), and taking a mount down. Read by the supervisor, the
materializer and `lazysnap status`; no state of its own."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from pathlib import Path

from snapshotter import sidecars
from snapshotter.fs.mount_spec import MOUNT_PROCESS_MODULE
from snapshotter.fs.zygote import ZYGOTE_NAME

log = logging.getLogger("lazysnap.fs")

DEAD_CONNECTION = "FUSE connection is gone (ENOTCONN)"  # mount_problem(): its process died
LIVE = "live"
DEAD = "dead"  # ENOTCONN: the FUSE process is gone
ABSENT = "absent"  # a plain directory


def mount_problem(mountpoint: str) -> str | None:
    """Why the lazy mount at mountpoint is not usable, or None if it is live and served."""
    status = mount_status(mountpoint)
    if status == DEAD:
        return DEAD_CONNECTION
    if status == ABSENT:
        return "not mounted"
    pid = sidecars.state_pid(sidecars.read_state(mountpoint))
    if pid is None:
        return f"no state file {sidecars.state_path(mountpoint)}"
    if not is_mount_process(pid):
        return f"mount process {pid} is gone"
    return None


def mount_status(mountpoint: str) -> str:
    """LIVE, DEAD (ENOTCONN: the FUSE process is gone) or ABSENT (plain directory)."""
    try:
        # statfs always reaches the FUSE process; stat may be answered from the attr cache.
        os.statvfs(mountpoint)
        own = os.stat(mountpoint).st_dev
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return DEAD
        return ABSENT
    try:
        parent = os.stat(os.path.dirname(mountpoint.rstrip("/")) or "/").st_dev
    except OSError:
        return ABSENT
    return LIVE if own != parent else ABSENT


def detach(mountpoint: str) -> None:
    """Lazily unmount: mounts stacked on it (containers' overlays) keep their reference."""
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        with contextlib.suppress(OSError):
            if subprocess.run(command, capture_output=True, check=False).returncode == 0:
                return
    log.warning("could not unmount %s", mountpoint)


def process_alive(pid: int | None) -> bool:
    """True if pid names a process that is alive (not a zombie); no check of what it runs."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return bool(state) and state[0] != "Z"


def is_mount_process(pid: int) -> bool:
    """True if pid is alive (not a zombie) and is a mount process, not a reused pid. Forked
    ones keep the zygote's command line (it names the module too); the zygote is not one."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = status.partition("(")[2].rpartition(")")
    state = rest.split()[0]
    return state != "Z" and MOUNT_PROCESS_MODULE.encode() in cmdline and name != ZYGOTE_NAME
