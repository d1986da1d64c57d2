"""Mount process start -> ready, outside containerd and the daemon: the part of a lazy pull's
critical path that the first run waits for (docs/benchmarks.md, "Critical path of a lazy pull").

A mount is started the way snapshotter/lazylayers/starter.py starts one (`python -m
snapshotter.fs.mount_process --spec FILE --ready-fd N`, cwd /, own session) from a given
checkout (PYTHONPATH), with a registry blob source, no prefetch, no background fetch, and timed
until it writes "ready". "zygote" instead has the daemon's zygote (snapshotter.fs.zygote.Zygote,
`[fuse] zygote`) fork one child per mount: the zygote process runs the checkout's mount code,
the daemon's side of it (start, fork, close) is this repository's.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.images import BuiltImage
from harness.procs import HarnessError, pid_alive, unmount_all_under
from snapshotter.fs.zygote import Zygote, ZygoteError

READY_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LayerFixture:
    """One indexed layer of the pushed image: its encoded index file and blob address."""

    digest: str
    size: int
    entries: int
    index_path: Path


def layer_indexes(image: BuiltImage, cache: Path, progress: Progress) -> list[LayerFixture]:
    """Index every layer of the image's OCI layout (like `lazysnap index build`, default span
    size), cached in cache/index-<hex>.bin across runs; ordered as in the manifest."""
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import decode_index, encode_index

    cache.mkdir(parents=True, exist_ok=True)
    fixtures: list[LayerFixture] = []
    for layer in image.layers:
        hex_digest = layer.digest.split(":", 1)[1]
        path = cache / f"index-{hex_digest}.bin"
        if not path.exists():
            progress(f"setup: indexing layer {layer.digest[:19]} ({layer.size / 1e6:.0f} MB)")
            with open(image.layout / "blobs" / "sha256" / hex_digest, "rb") as blob:
                index = build_layer_index(
                    blob, media_type=layer.media_type, expected_digest=layer.digest
                )
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(encode_index(index))
            tmp.rename(path)
        index = decode_index(path.read_bytes())
        fixtures.append(LayerFixture(layer.digest, layer.size, len(index.entries), path))
    return fixtures


@dataclass
class MountRun:
    """One started mount: its work dir (spec, mountpoint, cache), pid, and ready pipe."""

    work: Path
    pid: int
    ready_fd: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def mountpoint(self) -> Path:
        return self.work / "mnt"


def write_spec(work: Path, layer: LayerFixture, registry_host: str, repository: str) -> Path:
    (work / "mnt").mkdir(parents=True)
    spec = {
        "mountpoint": str(work / "mnt"),
        "index_path": str(layer.index_path),
        "blob": {
            "kind": "registry",
            "location": f"{registry_host}/{repository}",
            "access": {"plain_http": [registry_host]},
            "digest": layer.digest,
            "size": layer.size,
        },
        "cache_dir": str(work / "cache"),
        "cache_max_bytes": 1 << 30,
        "prefetch": False,
        "background": False,
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def checkout_env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo)}


def start_cold(work: Path, spec: Path, repo: Path) -> MountRun:
    """A fresh interpreter, as the daemon starts one."""
    read_end, write_end = os.pipe()
    with open(work / "mount.log", "ab") as log:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapshotter.fs.mount_process",
                "--spec",
                str(spec),
                "--ready-fd",
                str(write_end),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_end,),
            start_new_session=True,
            cwd="/",
            env=checkout_env(repo),
        )
    os.close(write_end)
    return MountRun(work, popen.pid, read_end, popen)


@contextlib.contextmanager
def pythonpath(repo: Path) -> Iterator[None]:
    """PYTHONPATH=repo for the processes started meanwhile (Zygote.start takes no env)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(repo)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


class CheckoutZygote:
    """The daemon's zygote running one checkout's mount code, started as starter.py starts
    it; start() asks it for one mount process, as the manager does for a lazy layer."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        with pythonpath(repo):
            try:
                self.zygote = Zygote.start(sys.executable, "snapshotter.fs.mount_process")
            except ZygoteError as exc:
                raise HarnessError(f"zygote of {repo}: {exc}") from None

    def start(self, work: Path, spec: Path) -> MountRun:
        read_end, write_end = os.pipe()
        try:
            with open(work / "mount.log", "ab") as log:
                child = self.zygote.fork(str(spec), write_end, log.fileno())
        except ZygoteError as exc:
            os.close(read_end)
            raise HarnessError(
                f"zygote of {self.repo}: {exc} (checkouts before 4b28eec have none)"
            ) from None
        finally:
            os.close(write_end)
        child.close()  # followed by pid like the others: stop() treats a zombie as gone
        return MountRun(work, child.pid, read_end)

    def close(self) -> None:
        self.zygote.close()  # the zygote exits; its children were stopped already


def wait_ready(run: MountRun, timeout: float = READY_TIMEOUT_S) -> str:
    """The mount's ready line ("ready" or "error: ..."); "" if it exited without one."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([run.ready_fd], [], [], left)[0]:
                return f"error: not ready within {timeout:g} s"
            chunk = os.read(run.ready_fd, 256)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(run.ready_fd)
        run.ready_fd = -1
    return data.decode(errors="replace").strip()


def stop(run: MountRun) -> None:
    """SIGTERM the mount process (it unmounts), wait for it, then clear what it left."""
    if run.ready_fd >= 0:
        os.close(run.ready_fd)
        run.ready_fd = -1
    with contextlib.suppress(ProcessLookupError):
        os.kill(run.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if run.popen is not None and run.popen.poll() is not None:
            break
        if run.popen is None and not pid_alive(run.pid):
            break
        time.sleep(0.02)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)
        if run.popen is not None:
            run.popen.wait()
    unmount_all_under(run.work)


@contextlib.contextmanager
def work_dir(parent: Path, prefix: str = "cpm-") -> Iterator[Path]:
    """A fresh dir for one mount, removed (never across a mount: --one-file-system)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        unmount_all_under(work)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def time_mounts(
    layers: list[LayerFixture],
    registry_host: str,
    repository: str,
    scratch: Path,
    start: Callable[[Path, Path], MountRun],
) -> float:
    """Start one mount per layer at once; seconds until the last is ready."""
    with contextlib.ExitStack() as stack:
        works = [stack.enter_context(work_dir(scratch)) for _ in layers]
        specs = [
            write_spec(work, layer, registry_host, repository)
            for work, layer in zip(works, layers, strict=True)
        ]
        runs: list[MountRun] = []
        try:
            began = time.perf_counter()
            for work, spec in zip(works, specs, strict=True):
                runs.append(start(work, spec))
            answers = [wait_ready(run) for run in runs]
            elapsed = time.perf_counter() - began
        finally:
            for run in runs:
                stop(run)
        for run, answer in zip(runs, answers, strict=True):
            if answer != "ready":
                log = run.work / "mount.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise HarnessError(f"mount at {run.mountpoint}: {answer or 'no answer'}\n{tail}")
        return elapsed
