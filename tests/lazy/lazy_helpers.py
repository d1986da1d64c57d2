"""What the lazy-pull acceptance tests share: the CLI steps a user runs (index build, pull, run),
images with known contents, and where to look in the daemon's logs and root."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.containerd import Containerd
from harness.daemon import LazysnapDaemon, lazysnap_command
from harness.images import (
    BuiltImage,
    PushedImage,
    busybox_layer_tar,
    directory,
    file,
    layer_tar,
    push,
    write_oci_layout,
)
from harness.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
FALLBACK_PHRASE = "falls back to a full pull"
_PULL_SUMMARY = re.compile(r"\((?P<lazy>\d+) lazy, (?P<pulled>\d+) pulled")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class PullResult:
    stdout: str
    lazy: int
    pulled: int


@dataclass
class LazyStack:
    """The session's containerd, registry and lazysnap daemon, seen from one test: its own
    containerd namespace and scratch directory."""

    containerd: Containerd
    registry: Registry
    daemon: LazysnapDaemon
    namespace: str
    workdir: Path

    # -- the commands a user runs ----------------------------------------------------------------

    def lazysnap(
        self,
        *args: str,
        timeout: float = 300.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            [*lazysnap_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lazysnap {' '.join(args)} failed (rc={result.returncode}):\n"
                f"{result.stderr}{result.stdout}"
            )
        return result

    def index_build(self, reference: str, *extra: str) -> str:
        """`lazysnap index build` of every layer, however small (the test images' are)."""
        args = ["index", "build", "--min-layer-size", "0", *extra]
        if "--hosts-dir" not in extra:
            args.append("--plain-http")
        return self.lazysnap(*args, reference).stdout

    def pull(
        self,
        reference: str,
        *,
        hosts_dir: Path | None = None,
        snapshotter: str = "lazysnap",
        through_daemon: bool = True,
    ) -> PullResult:
        """`lazysnap pull` into this test's namespace; containerd's hosts dir unless given.
        By default run by this stack's daemon (its pull socket), as a user's pull is when
        `lazysnap serve` runs; through_daemon=False pulls in the CLI's own process."""
        where = (
            ["--daemon-address", str(self.daemon.socket)]
            if through_daemon
            else ["--no-daemon", "--daemon-config", str(self.daemon.config)]
        )
        result = self.lazysnap(
            "pull",
            *where,
            "--address",
            str(self.containerd.address),
            "--namespace",
            self.namespace,
            "--hosts-dir",
            str(hosts_dir or self.containerd.hosts_dir),
            "--snapshotter",
            snapshotter,
            reference,
        )
        match = _PULL_SUMMARY.search(result.stdout)
        assert match is not None, f"no pull summary in:\n{result.stdout}"
        return PullResult(result.stdout, int(match["lazy"]), int(match["pulled"]))

    def ctr_pull(self, reference: str, *, snapshotter: str) -> None:
        """containerd's own pull (`ctr images pull`) into this test's namespace."""
        self.containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(self.containerd.hosts_dir),
            "--snapshotter",
            snapshotter,
            reference,
            namespace=self.namespace,
            timeout=600,
        )

    def run(
        self,
        reference: str,
        *command: str,
        snapshotter: str = "lazysnap",
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` a container (its exit code is in the result, not checked)."""
        return self.containerd.ctr(
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            unique_name("lzs-lazy"),
            *command,
            namespace=self.namespace,
            timeout=timeout,
            check=False,
        )

    def run_ok(self, reference: str, *command: str, snapshotter: str = "lazysnap") -> str:
        result = self.run(reference, *command, snapshotter=snapshotter)
        assert result.returncode == 0, (
            f"container {' '.join(command)} failed (rc={result.returncode}): {result.stderr}"
        )
        return result.stdout

    # -- images --------------------------------------------------------------------------------

    def push(self, image: BuiltImage, repository: str) -> PushedImage:
        return push(image, self.registry.host, repository, image.tag)

    # -- what the daemon did -------------------------------------------------------------------

    def daemon_log_offset(self) -> int:
        try:
            return self.daemon.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def daemon_log_since(self, offset: int) -> str:
        with open(self.daemon.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def fallback_lines(self, since: int, layer_digest: str) -> list[str]:
        """The daemon's "layer <digest> falls back to a full pull: <why>" lines since offset."""
        about = f"layer {layer_digest} {FALLBACK_PHRASE}"
        return [line for line in self.daemon_log_since(since).splitlines() if about in line]

    def lazy_mount(self, layer_digest: str, timeout: float = 30.0) -> Path:
        """The live FUSE mountpoint serving layer_digest (state file written by its process).
        Prepare answers once the mount process is started, so wait for it to be live."""
        deadline = time.monotonic() + timeout
        while True:
            for state_file in (self.daemon.root / "snapshots").glob("*/fs.lazysnap.json"):
                try:
                    state = json.loads(state_file.read_text())
                except (OSError, ValueError):
                    continue
                mountpoint = Path(str(state.get("mountpoint", "")))
                if state.get("layer_digest") == layer_digest and os.path.ismount(mountpoint):
                    return mountpoint
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no live lazy mount of layer {layer_digest} under {self.daemon.root} "
                    f"after {timeout:.0f} s"
                )
            time.sleep(0.1)


def mount_log(mountpoint: Path) -> str:
    """The mount process's log (EIO lines name the layer, span and cause)."""
    path = mountpoint.with_name(mountpoint.name + ".lazysnap.log")
    return path.read_text(errors="replace")


# -- images with known contents ------------------------------------------------------------------


@dataclass(frozen=True)
class DataImage:
    """busybox (for sh, cat, sha256sum) plus incompressible files under /data, so each file's
    bytes sit at a known place in the layer blob and no other image shares that layer."""

    built: BuiltImage
    files: Mapping[str, bytes]  # "data/<name>" -> contents

    @property
    def data_layer(self) -> str:
        return self.built.layers[-1].digest


def _concatenated(*tars: bytes) -> bytes:
    """One tar holding the members of tars, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as joined:
        for blob in tars:
            with tarfile.open(fileobj=io.BytesIO(blob)) as part:
                for member in part.getmembers():
                    joined.addfile(member, part.extractfile(member) if member.isreg() else None)
    return out.getvalue()


def build_data_image(
    layout: Path,
    file_sizes: Mapping[str, int],
    *,
    one_layer: bool = False,
    cmd: Sequence[str] = ("/bin/sh",),
) -> DataImage:
    """A gzip image of busybox and /data/<name> of random bytes per file_sizes: two layers
    (busybox, data), or with one_layer a single layer of both. A lazily committed layer is
    shared by every containerd namespace (the target chain ID is global in the snapshotter), so
    the busybox layer may already be present from another test; one_layer makes every layer of
    the image its own."""
    files = {f"data/{name}": os.urandom(size) for name, size in file_sizes.items()}
    data = layer_tar([directory("data"), *(file(path, blob) for path, blob in files.items())])
    busybox = busybox_layer_tar(layout.parent)
    layout.mkdir(parents=True, exist_ok=True)
    layers = [_concatenated(busybox, data)] if one_layer else [busybox, data]
    built = write_oci_layout(layout, "latest", layers, cmd=cmd)
    return DataImage(built, files)
