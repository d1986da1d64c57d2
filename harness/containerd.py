"""containerd 1.6 with its own root, state and sockets, wired to lazysnap as a proxy plugin.

Several containerd instances can share a machine, but runc state, shim fifos and cgroups are
keyed by namespace and container id, so each instance gets a private namespace and callers use
unique container ids.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import HarnessError, Service, run, spawn, unmount_all_under

CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr"
SNAPSHOTTER_NAME = "lazysnap"
CRI_NAMESPACE = "k8s.io"
SHARED_NAMESPACES = frozenset({CRI_NAMESPACE, "default", "moby"})
RUNC_STATE = Path("/run/containerd/runc")
UNIX_PATH_MAX = 107  # shared by every containerd on the machine


@dataclass
class Containerd:
    base: Path
    service: Service = field(repr=False)
    namespace: str
    proxy_socket: Path | None
    cri: bool

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def hosts_dir(self) -> Path:
        return self.base / "certs.d"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    def ctr(
        self, *args: str, namespace: str | None = None, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCKET -n NAMESPACE args...`; raise HarnessError (with stderr) on failure
        when check is true."""
        argv = [CTR_BINARY, "-a", str(self.address), "-n", namespace or self.namespace, *args]
        if check:
            return run(argv, "ctr", timeout=timeout)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def pull(self, reference: str, *, snapshotter: str = SNAPSHOTTER_NAME) -> None:
        """`ctr images pull` through the hosts dir (plain http to the local registry)."""
        self.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(self.hosts_dir),
            "--snapshotter",
            snapshotter,
            reference,
        )

    def run_container(
        self,
        reference: str,
        *command: str,
        snapshotter: str = SNAPSHOTTER_NAME,
        container_id: str | None = None,
        timeout: float = 120.0,
    ) -> str:
        """`ctr run --rm` a container from a pulled image and return its stdout."""
        cid = container_id or f"lzs-{secrets.token_hex(4)}"
        result = self.ctr(
            "run", "--rm", "--snapshotter", snapshotter, reference, cid, *command, timeout=timeout
        )
        return result.stdout

    def _kill_containers(self, namespace: str) -> None:
        tasks = self.ctr("tasks", "ls", "-q", namespace=namespace, check=False, timeout=30)
        for task in tasks.stdout.split():
            self.ctr(
                "tasks", "kill", "-s", "SIGKILL", task, namespace=namespace, check=False, timeout=30
            )
        for task in tasks.stdout.split():
            for _ in range(50):  # the task must be stopped before it can be deleted
                if (
                    self.ctr(
                        "tasks", "delete", task, namespace=namespace, check=False, timeout=30
                    ).returncode
                    == 0
                ):
                    break
                time.sleep(0.1)
        containers = self.ctr(
            "containers", "ls", "-q", namespace=namespace, check=False, timeout=30
        )
        for container in containers.stdout.split():
            self.ctr("containers", "rm", container, namespace=namespace, check=False, timeout=30)

    def stop(self) -> None:
        """Kill our tasks and containers, stop containerd, then lazy-unmount anything left
        under base (rootfs overlays, FUSE mounts)."""
        namespaces = {self.namespace}
        if self.service.alive():
            # Tests may add namespaces of their own: clean every one this instance knows.
            listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=30)
            namespaces.update(listed.stdout.split())
            for namespace in sorted(namespaces):
                # Best effort: containerd itself is stopped next regardless.
                with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                    self._kill_containers(namespace)
        self.service.stop()
        unmount_all_under(self.base)
        # runc keeps per-namespace state outside our base; drop our private ones once empty
        # (not the well-known ones another containerd on the machine may be using).
        for namespace in namespaces - SHARED_NAMESPACES:
            with contextlib.suppress(OSError):
                (RUNC_STATE / namespace).rmdir()


def _config_toml(base: Path, proxy_socket: Path | None, cri: bool) -> str:
    disabled = "" if cri else '"io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        f"disabled_plugins = [{disabled}]",
        "[grpc]",
        f'  address = "{base / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{base / "containerd.sock.ttrpc"}"',
        "[debug]",
        f'  address = "{base / "containerd-debug.sock"}"',
        '  level = "info"',
        "[metrics]",
        '  address = ""',
        "[plugins]",
        '  [plugins."io.containerd.internal.v1.opt"]',
        f'    path = "{base / "opt"}"',
    ]
    if cri:
        lines += [
            '  [plugins."io.containerd.grpc.v1.cri"]',
            "    netns_mounts_under_state_dir = true",
            '    [plugins."io.containerd.grpc.v1.cri".containerd]',
            f'      snapshotter = "{SNAPSHOTTER_NAME}"',
            # Without this the CRI pull passes no layer labels and nothing can be lazy.
            "      disable_snapshot_annotations = false",
            '    [plugins."io.containerd.grpc.v1.cri".registry]',
            f'      config_path = "{base / "certs.d"}"',
        ]
    if proxy_socket is not None:
        lines += [
            "[proxy_plugins]",
            f"  [proxy_plugins.{SNAPSHOTTER_NAME}]",
            '    type = "snapshot"',
            f'    address = "{proxy_socket}"',
        ]
    return "\n".join(lines) + "\n"


def write_hosts_toml(hosts_dir: Path, registry_host: str) -> None:
    """Tell containerd (ctr --hosts-dir, CRI config_path) the local registry is plain http."""
    directory = hosts_dir / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(
        f'server = "http://{registry_host}"\n'
        f'[host."http://{registry_host}"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
        "  skip_verify = true\n"
    )


def start_containerd(
    base: Path,
    *,
    proxy_socket: Path | None,
    registry_hosts: Sequence[str] = (),
    cri: bool = False,
    namespace: str | None = None,
) -> Containerd:
    """Start containerd under base and wait until it answers `ctr version`.

    proxy_socket: where lazysnap listens (containerd dials lazily, so the daemon may start later).
    """
    for binary in (CONTAINERD_BINARY, CTR_BINARY, "runc"):
        if shutil.which(binary) is None:
            raise HarnessError(f"{binary} not found (apt-get install containerd runc)")
    base.mkdir(parents=True, exist_ok=True)
    # sun_path holds 108 bytes with the NUL: longer socket paths fail to bind. (100 was the old
    # limit here; pytest's tmp_path reached it once its numbered dir got a third digit.)
    if len(str(base / "containerd.sock.ttrpc")) > UNIX_PATH_MAX:
        raise HarnessError(f"containerd base {base} is too long for unix socket paths")
    config = base / "config.toml"
    config.write_text(_config_toml(base, proxy_socket, cri))
    for host in registry_hosts:
        write_hosts_toml(base / "certs.d", host)
    service = spawn(
        "containerd", [CONTAINERD_BINARY, "--config", str(config)], base / "containerd.log"
    )
    instance = Containerd(
        base, service, namespace or f"lzs-{secrets.token_hex(4)}", proxy_socket, cri
    )

    def answers() -> bool:
        return instance.ctr("version", check=False, timeout=10).returncode == 0

    try:
        service.wait_until(answers, "ctr version answers", 60)
    except HarnessError:
        instance.stop()
        raise
    return instance


def containerd_running_at(
    base: Path, pid: int, namespace: str, proxy_socket: Path | None, cri: bool
) -> Containerd:
    """Re-attach to a containerd started by an earlier process (the `up`/`down` CLI)."""
    return Containerd(
        base, Service("containerd", pid, base / "containerd.log"), namespace, proxy_socket, cri
    )
