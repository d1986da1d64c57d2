"""The lowest CPU and I/O priority, for the work that follows a container's start (background
fetch, the completion check, the copy to plain files): on a node of two cores it must not slow
the next container that starts.

A thread lowers itself (Linux keeps nice and the I/O priority per thread), a helper process is
started under HELPER_PREFIX (so everything it starts, such as cp, inherits both). The I/O idle
class only works where the disk's scheduler has classes (bfq); under "none" or mq-deadline the
kernel ignores it, and the busy gate (activity.py) is what keeps such work off a start.

A request from a process at BACKGROUND_NICE is the node's own background work (the copy reads
the layer through its FUSE mount): caller_is_background() tells the busy meter to leave it out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading

BACKGROUND_NICE = 19
IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread alone
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
_COMM_MAX = 15  # bytes of a thread's name the kernel keeps

HELPER_PREFIX = ("nice", "-n", str(BACKGROUND_NICE), "ionice", "-c", str(IOPRIO_CLASS_IDLE))


def lower_this_thread(name: str) -> None:
    """nice 19 and the idle I/O class for the calling thread only, which the kernel also
    names `name` (ps -L, top -H, /proc/*/task/*/comm show which thread works). Best effort:
    a kernel or sandbox that refuses any of it leaves the thread as it was."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    if _SYS_IOPRIO_SET is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            idle = IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
            libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, idle)
    with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm", "w") as comm:
        comm.write(name.encode()[:_COMM_MAX].decode(errors="ignore"))


def caller_is_background(pid: int) -> bool:
    """True if the process (or thread) pid runs at BACKGROUND_NICE: the node's own background
    work, not a container. False for pid 0 (the kernel did not say) and for a gone process."""
    if pid <= 0:
        return False
    try:
        return os.getpriority(os.PRIO_PROCESS, pid) >= BACKGROUND_NICE
    except OSError:
        return False
