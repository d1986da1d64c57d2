"""A benchmark node: containerd + `lazysnap serve` (harness) that can be made cold.

reset() is what "cold node" means in every trial: stop containerd and lazysnap, unmount what
they left, wipe their state directories (lazysnap's includes its span cache), drop the page
cache, start both again. Only the registry (the remote side) survives.
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


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names text (our daemon's detached FUSE mount processes
    carry its root in their arguments)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


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
        for pid in _pids_mentioning(str(self.lazysnap_base)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        unmount_all_under(self.base)

    def reset(self, checkout: Path = REPO_ROOT, extra_config: str = "") -> None:
        """Make the node cold and start it again (lazysnap's code from `checkout`, its
        config.toml with extra_config appended)."""
        self.stop()
        shutil.rmtree(self.containerd_base, ignore_errors=True)
        shutil.rmtree(self.lazysnap_base, ignore_errors=True)
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
