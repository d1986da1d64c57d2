"""Disk and failure limits through the real stack (containerd, registry, FUSE, runc), with the
daemon's root and its span cache on a small ext4 filesystem of their own (a loop device):

- reading lazily more than the disk holds never eats into the cache's free-space reserve,
  containers keep writing, and removing the image gives the disk back at once;
- what the daemon and mount processes write is private (umask 022, cache dir outside the root):
  another user reads neither span nor state files, while containers read their files;
- a span whose bytes never verify: reads of it get EIO, background fetch gives it up, the layer
  shows `degraded` and never more than 100 % fetched;
- a copy to plain files that would write more than the layer is refused at once, FUSE keeps
  serving, and `lazysnap status` says why.

Its own containerd and lazysnap daemon (background fetch and materialize on, short quiet
period): the session daemon runs with background fetch off and its root on the big disk."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.containerd import Containerd, start_containerd
from harness.daemon import LazysnapDaemon, start_lazysnap
from harness.images import PushedImage
from harness.procs import unmount_all_under
from harness.registry import Registry
from snapshotter.fs.disk_reserve import disk_space
from snapshotter.index.codec import decode_index, encode_index
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import spans_for_range
from snapshotter.remote.reference import Reference
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name
from tests.lazy.test_lazy_fallback import _index_blob, _push_index_artifact, registry_client

pytestmark = pytest.mark.stack
DISK_MB = 128  # the filesystem holding the root and the cache
RESERVE = 32 << 20  # [cache] min_free_bytes
SLACK = 4 << 20  # what else writes there while spans are cached (metadata, state files)
QUIET_SECONDS = 2
Crafter = Callable[[LayerIndex], LayerIndex]
WAIT_S = 120.0


@dataclasses.dataclass(frozen=True)
class DiskStack:
    containerd: Containerd
    daemon: LazysnapDaemon
    disk: Path  # the small filesystem's mount
    cache_dir: Path  # on it, outside the root


def _config(base: Path, registry: Registry, hosts_dir: Path, cache_dir: Path) -> Path:
    path = base / "config.toml"
    base.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join(
            [
                f'address = "{base / "lazysnap.sock"}"',
                "[remote]",
                f'hosts_dir = "{hosts_dir}"',
                f'plain_http = ["{registry.host}"]',
                "min_layer_size = 0",
                "fetch_timeout_seconds = 10",
                "[cache]",
                f'dir = "{cache_dir}"',
                f"min_free_bytes = {RESERVE}",
                "min_free_percent = 0",
                "[fetch]",
                "background = true",
                f"background_quiet_seconds = {QUIET_SECONDS}",
                "materialize = true",
                # Disk limits, not trust: the crafted indexes here (a wrong span digest, aliased
                # files) are unsigned, and the genuine ones are built signed by the session key.
                "[trust]",
                'mode = "permissive"',
            ]
        )
        + "\n"
    )
    return path


@contextlib.contextmanager
def _small_ext4(image: Path, mountpoint: Path, size_mb: int) -> Iterator[Path]:
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mountpoint.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        unmount_all_under(mountpoint)
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def disk_stack(registry: Registry) -> Iterator[DiskStack]:
    base = Path(tempfile.mkdtemp(prefix="lzs-disk-", dir="/tmp"))  # short: unix socket paths
    old_umask = os.umask(0o022)  # what a distribution's service manager gives: files 0644
    try:
        with _small_ext4(base / "disk.img", base / "disk", DISK_MB) as disk:
            # The root is the daemon's BASE/root: bind a directory of the small disk there, so
            # root and cache share the disk while the cache is outside the root.
            (disk / "root").mkdir()
            cache_dir = disk / "cache"
            (base / "lazysnap" / "root").mkdir(parents=True)
            subprocess.run(
                ["mount", "--bind", str(disk / "root"), str(base / "lazysnap" / "root")],
                check=True,
            )
            containerd = start_containerd(
                base / "ctd",
                proxy_socket=base / "lazysnap" / "lazysnap.sock",
                registry_hosts=[registry.host],
            )
            try:
                config = _config(base / "lazysnap", registry, containerd.hosts_dir, cache_dir)
                daemon = start_lazysnap(base / "lazysnap", config=config)
                try:
                    yield DiskStack(containerd, daemon, disk, cache_dir)
                finally:
                    containerd.stop()
                    daemon.stop()
            finally:
                unmount_all_under(base / "lazysnap")
                unmount_all_under(disk)
    finally:
        os.umask(old_umask)
        unmount_all_under(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stack(disk_stack: DiskStack, registry: Registry, stack_base: Path) -> Iterator[LazyStack]:
    workdir = Path(tempfile.mkdtemp(prefix="disk-", dir=stack_base))
    lazy = LazyStack(
        disk_stack.containerd, registry, disk_stack.daemon, unique_name("lzs-disk"), workdir
    )
    yield lazy
    remove_namespace_content(disk_stack.containerd, lazy.namespace)
    shutil.rmtree(workdir, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f}s: {what}")
        time.sleep(0.25)


def _layers(stack: LazyStack) -> list[dict[str, object]]:
    out = stack.lazysnap("status", "--root", str(stack.daemon.root), "--json").stdout
    layers = json.loads(out)["layers"]
    assert isinstance(layers, list)
    return layers


def _layer(stack: LazyStack, digest: str) -> dict[str, object]:
    found = [layer for layer in _layers(stack) if layer["layer_digest"] == digest]
    assert found, f"no layer {digest} in lazysnap status"
    return found[0]


def _spans_dir(disk_stack: DiskStack, digest: str) -> Path:
    return disk_stack.cache_dir / "spans" / "sha256" / digest.split(":", 1)[1]


class _FreeSpaceWatch:
    """The least free space seen on a filesystem, sampled every 20 ms while running."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.least = disk_space(path).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _FreeSpaceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.least = min(self.least, disk_space(self.path).free)


def _push_crafted_index(
    stack: LazyStack, source: PushedImage, target: PushedImage, layer_digest: str, craft: Crafter
) -> None:
    """Push craft(the index `index build` made for source's layer) as target's index of it,
    with the windows blob it needs (a format-2 index reads windows from the layer's repo)."""
    with registry_client(stack) as client:
        genuine = decode_index(_index_blob(client, source, layer_digest))
        if genuine.windows is not None:
            windows = client.get_blob(
                Reference.parse(source.reference).repository, genuine.windows.digest
            )
            client.push_blob(Reference.parse(target.reference).repository, windows)
        _push_index_artifact(client, target, layer_digest, encode_index(craft(genuine)))


def _as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *command], capture_output=True, text=True, check=False
    )


# -- the tests -----------------------------------------------------------------------------------


def test_reading_more_than_the_disk_holds_keeps_the_reserve_and_removal_frees_it(
    stack: LazyStack, disk_stack: DiskStack
) -> None:
    disk = disk_stack.disk
    before = disk_space(disk).free
    sizes = {"a": 40 << 20, "b": 40 << 20, "c": 40 << 20}  # 120 MiB for ~115 MiB of disk
    image = build_data_image(stack.workdir / "big", sizes)
    pushed = stack.push(image.built, unique_name("test/disk-big"))
    stack.index_build(pushed.reference)
    pulled = stack.pull(pushed.reference)
    assert (pulled.lazy, pulled.pulled) == (2, 0), pulled.stdout
    with _FreeSpaceWatch(disk) as watch:
        output = stack.run_ok(pushed.reference, "sha256sum", "/data/a", "/data/b", "/data/c")
        # background fetch goes on once the node is quiet: until the disk reserve stops it
        _wait_for(
            lambda: _layer(stack, image.data_layer)["background"] == "cache-full",
            WAIT_S,
            "background fetch stopping at the disk reserve",
        )
    for path, data in image.files.items():
        assert f"{hashlib.sha256(data).hexdigest()}  /{path}" in output, output
    assert watch.least >= RESERVE - SLACK, (
        f"free space fell to {watch.least >> 20} MiB, reserve {RESERVE >> 20} MiB"
    )
    # containers keep writing: the reserve is theirs
    wrote = stack.run_ok(
        pushed.reference,
        "sh",
        "-c",
        "dd if=/dev/zero of=/fill bs=1M count=16 2>/dev/null && sync && wc -c < /fill",
    )
    assert wrote.strip() == str(16 << 20), wrote
    assert any(_spans_dir(disk_stack, image.data_layer).iterdir())

    # ours alone: another user on the node reads neither spans nor state files
    span_file = next(_spans_dir(disk_stack, image.data_layer).iterdir())
    assert _as_nobody("cat", str(span_file)).returncode != 0
    state_files = list(stack.daemon.root.glob("snapshots/*/fs.lazysnap.json"))
    assert state_files
    denied = _as_nobody("cat", str(state_files[0]))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    for top, dirs, files in os.walk(disk_stack.cache_dir):
        for name in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
            assert mode == 0o700, f"{top}/{name}: {mode:o}"
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
            assert mode == 0o600, f"{top}/{name}: {mode:o}"
    for sidecar in stack.daemon.root.glob("snapshots/*/fs.lazysnap*"):
        if sidecar.is_file():
            mode = stat.S_IMODE(sidecar.stat().st_mode)
            assert mode == 0o600, f"{sidecar}: {mode:o}"

    # the image goes: its layers' spans go with it, not at the next eviction
    used = before - disk_space(disk).free
    assert used > 40 << 20
    remove_namespace_content(stack.containerd, stack.namespace)
    _wait_for(
        lambda: not _spans_dir(disk_stack, image.data_layer).exists(),
        WAIT_S,
        "the removed layer's spans deleted",
    )
    after = disk_space(disk).free
    assert before - after < 8 << 20, (
        f"{(before - after) >> 20} MiB still used after removing the image"
    )


def test_a_span_that_never_verifies_degrades_the_layer_and_fetch_stops(
    stack: LazyStack, disk_stack: DiskStack
) -> None:
    image = build_data_image(stack.workdir / "bad", {"good": 1 << 20, "bad": 1 << 20})
    source = stack.push(image.built, unique_name("test/disk-bad-src"))
    stack.index_build(source.reference, "--span-size", str(256 << 10))
    target = stack.push(image.built, unique_name("test/disk-bad"))

    def wrong_digest(genuine: LayerIndex) -> LayerIndex:
        bad = next(e for e in genuine.entries if e.name == "data/bad")
        wrong_span = spans_for_range(genuine, bad.offset, bad.offset + bad.size)[1]
        spans = list(genuine.spans)
        spans[wrong_span] = dataclasses.replace(spans[wrong_span], digest="sha256:" + "0" * 64)
        return dataclasses.replace(genuine, spans=tuple(spans))

    _push_crafted_index(stack, source, target, image.data_layer, wrong_digest)
    pulled = stack.pull(target.reference)
    # only the data layer has an index in this repository
    assert (pulled.lazy, pulled.pulled) == (1, 1), pulled.stdout
    good = stack.run_ok(target.reference, "sha256sum", "/data/good")
    assert hashlib.sha256(image.files["data/good"]).hexdigest() in good
    failed = stack.run(target.reference, "cat", "/data/bad")
    assert failed.returncode != 0 and "Input/output error" in failed.stderr + failed.stdout, failed
    _wait_for(
        lambda: _layer(stack, image.data_layer)["background"] == "degraded",
        WAIT_S,
        "background fetch giving the bad span up",
    )
    layer = _layer(stack, image.data_layer)
    assert layer["degraded_spans"] == 1
    fetched = layer["fetched_percent"]
    assert isinstance(fetched, float | int) and fetched <= 100, layer
    spans_total = layer["spans_total"]
    assert isinstance(spans_total, int)
    assert layer["spans_cached"] == spans_total - 1  # every other span came in
    settled = layer["bytes_fetched"]
    time.sleep(2 * QUIET_SECONDS + 1)  # nothing more is fetched for it
    assert _layer(stack, image.data_layer)["bytes_fetched"] == settled
    text = stack.lazysnap("status", "--root", str(stack.daemon.root)).stdout
    assert "degraded: 1 span(s) never verified" in text, text


def test_an_index_aliasing_one_files_data_never_reaches_the_disk(
    stack: LazyStack, disk_stack: DiskStack
) -> None:
    """50 entries pointing at one 2 MiB file once made the copy to plain files write 100 MiB
    from a 2 MiB layer and fill the disk. Such an index is now refused when it is decoded
    (overlapping data ranges), so the layer is pulled whole; the copy's own bound (it never
    writes more than the layer's files: tests/fs/test_materialize_fs.py) and the completion
    check (the TOC differs from the tar) stay behind it as further lines of defence."""
    image = build_data_image(stack.workdir / "alias", {"one": 2 << 20})
    source = stack.push(image.built, unique_name("test/disk-alias-src"))
    stack.index_build(source.reference)
    target = stack.push(image.built, unique_name("test/disk-alias"))

    def aliasing(genuine: LayerIndex) -> LayerIndex:
        one = next(e for e in genuine.entries if e.name == "data/one")
        aliases = tuple(dataclasses.replace(one, name=f"data/alias-{n}") for n in range(50))
        return dataclasses.replace(genuine, entries=(*genuine.entries, *aliases))

    _push_crafted_index(stack, source, target, image.data_layer, aliasing)
    free = disk_space(disk_stack.disk).free
    pulled = stack.pull(target.reference)
    assert (pulled.lazy, pulled.pulled) == (0, 2), pulled.stdout
    assert "bad_index" in pulled.stdout and "overlaps the previous file's" in pulled.stdout
    script = "sha256sum /data/one; ls /data | grep -c alias || true"
    out = stack.run_ok(target.reference, "sh", "-c", script)
    assert hashlib.sha256(image.files["data/one"]).hexdigest() in out and out.endswith("0\n")
    assert disk_space(disk_stack.disk).free > free - (8 << 20)  # the layer's 2 MiB, not 100
