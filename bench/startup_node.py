"""A benchmark node: containerd + `lazysnap serve` (harness) that can be made cold.

reset() is what "cold node" means in every trial: stop containerd and lazysnap, unmount what
they left, stop the processes still using their directories, wipe those (lazysnap's includes
its span cache), drop the page cache, start both again. Only the registry (the remote side)
survives. After a run that was killed half-way it does the same: whatever that run left under
base is unmounted, stopped and removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.containerd import Containerd, start_containerd, write_hosts_toml
from harness.daemon import REPO_ROOT, LazysnapDaemon, start_lazysnap
from harness.procs import pid_alive, unmount_all_under


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def lazysnap_config(hosts_dir: Path, registry_host: str) -> str:
    """The daemon reads the registry the way containerd does: same hosts dir, plain http. The
    bench's indexes are unsigned: trust them (permissive), as before signatures existed."""
    return (
        f'[remote]\nhosts_dir = "{hosts_dir}"\nplain_http = ["{registry_host}"]\n'
        '[trust]\nmode = "permissive"\n'
    )


# How long a process that was sent SIGTERM (then SIGKILL) gets to be gone.
STOP_GRACE_S = 5.0
WIPE_ATTEMPTS = 5


def _pids_using(directory: Path) -> list[int]:
    """Processes (not this one) whose command line names directory, or that hold a file under
    it open or run in it. A mount process started plainly carries the daemon's root in its
    arguments; one the zygote forked carries the zygote's command line, and only its log (its
    stdout and stderr, beside its mountpoint) ties it to the node."""
    inside = f"{directory}/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(directory).encode() in Path(f"/proc/{entry}/cmdline").read_bytes() or any(
                target.startswith(inside) for target in _open_paths(int(entry))
            ):
                found.append(int(entry))
    return found


def _open_paths(pid: int) -> list[str]:
    """The paths of the process's open files and its working directory (a deleted file's
    path too, with the kernel's " (deleted)" after it)."""
    paths = [os.readlink(f"/proc/{pid}/cwd") + "/"]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return paths


def _stop_processes(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is left after STOP_GRACE_S; returns once all are gone (or
    the grace ran out again: a process stuck in the kernel, named by the wipe's error)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [pid for pid in pids if pid_alive(pid)]
        if not pids:
            return


def wipe_directory(directory: Path) -> None:
    """Remove directory whatever a killed or unfinished run left in it: mounts are detached and
    the processes using it stopped before each try, and the removal is checked (rmtree with
    ignore_errors leaves a directory behind silently, and a process still writing in it, such
    as a mount process saving its state as it exits, recreates what was removed). Raises
    RuntimeError naming what stayed after WIPE_ATTEMPTS tries."""
    problems: list[str] = []

    def note(_function: object, path: str, excinfo: tuple[type, BaseException, object]) -> None:
        problems.append(f"{path}: {excinfo[1]}")

    for _ in range(WIPE_ATTEMPTS):
        unmount_all_under(directory)
        _stop_processes(_pids_using(directory))
        problems.clear()
        if directory.exists():
            shutil.rmtree(directory, onerror=note)
        if not directory.exists():
            return
    raise RuntimeError(f"cannot remove {directory}: {'; '.join(problems[:5]) or 'it came back'}")


@dataclass
class ColdNode:
    base: Path  # short (unix socket paths): containerd in base/ctd, lazysnap in base/lzs
    registry_host: str
    namespace: str
    containerd: Containerd | None = None
    daemon: LazysnapDaemon | None = None

    @property
    def containerd_base(self) -> Path:
        return self.base / "ctd"

    @property
    def lazysnap_base(self) -> Path:
        return self.base / "lzs"

    @property
    def hosts_dir(self) -> Path:
        return self.containerd_base / "certs.d"

    def stop(self) -> None:
        """Stop containerd (first: its rootfs mounts sit on lazysnap's layers), then lazysnap
        and whatever FUSE mount processes it left, and unmount everything under base."""
        if self.containerd is not None:
            self.containerd.stop()
            self.containerd = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        unmount_all_under(self.base)
        _stop_processes(_pids_using(self.lazysnap_base))
        unmount_all_under(self.base)

    def wipe(self) -> None:
        """Stop the node and remove both state directories (also what a killed run left)."""
        self.stop()
        wipe_directory(self.containerd_base)
        wipe_directory(self.lazysnap_base)

    def reset(self, checkout: Path = REPO_ROOT, extra_config: str = "") -> None:
        """Make the node cold and start it again (lazysnap's code from `checkout`, its
        config.toml with extra_config appended)."""
        # Wiped before the sync (no dirty pages of deleted files to write back); nothing is
        # left that could recreate the directories while it runs: wipe stopped their users.
        self.wipe()
        drop_caches()
        self.lazysnap_base.mkdir(parents=True)
        write_hosts_toml(self.hosts_dir, self.registry_host)  # the daemon reads it too
        config = self.lazysnap_base / "config.toml"
        config.write_text(lazysnap_config(self.hosts_dir, self.registry_host) + extra_config)
        self.daemon = start_lazysnap(self.lazysnap_base, config=config, checkout=checkout)
        self.containerd = start_containerd(
            self.containerd_base,
            proxy_socket=self.daemon.socket,
            registry_hosts=[self.registry_host],
            namespace=self.namespace,
        )

    def running(self) -> tuple[Containerd, LazysnapDaemon]:
        if self.containerd is None or self.daemon is None:
            raise RuntimeError("node is not running: call reset() first")
        return self.containerd, self.daemon

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
