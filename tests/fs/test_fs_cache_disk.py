"""The span cache and the disk it is on: it keeps a free-space reserve on its filesystem
(evicting, then serving uncached), frees a blob's spans when its last mount is released, and
keeps what it writes private whatever the umask."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fs.blob_source import BlobSpec, FileBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.disk_reserve import DiskReserve, disk_space
from snapshotter.fs.mount_process import _Reporter, _StateKeeper
from snapshotter.fs.mount_spec import MountSpec
from snapshotter.fs.reader import LayerReader
from snapshotter.sidecars import read_state, state_path
from tests.fs.fs_helpers import built_index, make_tar, rich_members

SPAN = 100 << 10


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def _span(layer: str, number: int) -> bytes:
    return hashlib.sha256(f"{layer} {number}".encode()).digest() * (SPAN // 32)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 2 MiB tmpfs: a real file system that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = Path(tempfile.mkdtemp(prefix="lazysnap-cache-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


def test_the_cache_never_eats_into_the_reserve_and_evicts_to_keep_caching(
    small_disk: Path,
) -> None:
    reserve = DiskReserve(min_free_bytes=1 << 20, min_free_percent=0)
    cache = SpanCache(small_disk / "cache", 1 << 30, reserve=reserve)  # the bound allows all
    layer = _layer("a")
    stored = []
    for number in range(20):  # 2 MB of spans for a disk with 1 MiB to spare
        data = _span(layer, number)
        assert cache.put(layer, number, data, _sha(data)), f"span {number} not stored"
        stored.append(number)
        assert disk_space(small_disk).free >= 1 << 20
    # the newest spans are there, the oldest were evicted to make room for them
    assert cache.contains(layer, 19, _sha(_span(layer, 19)))
    assert not cache.contains(layer, 0, _sha(_span(layer, 0)))
    assert cache.approximate_usage().bytes >= cache.usage().bytes


def test_a_disk_filled_by_others_means_spans_are_not_cached_and_it_is_said_once(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reserve = DiskReserve(min_free_bytes=512 << 10, min_free_percent=0)
    cache = SpanCache(small_disk / "cache", 1 << 30, reserve=reserve)
    layer = _layer("b")
    first = _span(layer, 0)
    assert cache.put(layer, 0, first, _sha(first))
    # a container fills the disk up to the reserve
    (small_disk / "container-writes").write_bytes(b"w" * (disk_space(small_disk).free - 300_000))
    caplog.set_level(logging.INFO, logger="lazysnap.fs")
    for number in (1, 2, 3):
        data = _span(layer, number)
        assert not cache.put(layer, number, data, _sha(data))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(small_disk) in message and "min_free_bytes" in message
    # the cached span was evicted first: the reserve wins over the cache
    assert not cache.contains(layer, 0, _sha(first))
    # the container deletes its file: caching resumes
    (small_disk / "container-writes").unlink()
    data = _span(layer, 4)
    assert cache.put(layer, 4, data, _sha(data))
    assert any("caching spans again" in r.getMessage() for r in caplog.records)


def test_a_reserve_never_takes_more_than_half_the_filesystem() -> None:
    assert DiskReserve(1 << 30, 5).bytes_for(100 << 30) == 5 << 30
    assert DiskReserve(1 << 30, 5).bytes_for(10 << 30) == 1 << 30
    assert DiskReserve(1 << 30, 5).bytes_for(136 << 20) == 68 << 20


def test_spans_of_a_blob_are_freed_with_its_last_mount(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 30)
    shared, other = _layer("shared"), _layer("other")
    for layer in (shared, other):
        cache.add_user(layer, f"/mnt/{layer}/1")
        for number in range(3):
            data = _span(layer, number)
            assert cache.put(layer, number, data, _sha(data))
    cache.add_user(shared, "/mnt/shared/2")
    assert cache.release_user(shared, f"/mnt/{shared}/1") == 0  # the second mount still reads
    assert cache.contains(shared, 0, _sha(_span(shared, 0)))
    freed = cache.release_user(shared, "/mnt/shared/2")
    assert freed >= 3 * SPAN
    assert not cache.contains(shared, 0)
    assert cache.contains(other, 2, _sha(_span(other, 2)))  # another blob is untouched
    assert cache.approximate_usage() == cache.usage()


def test_what_the_cache_writes_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        directory = tmp_path / "outside" / "cache"
        cache = SpanCache(directory, 1 << 30)
        layer = _layer("private")
        data = _span(layer, 0)
        cache.add_user(layer, "/mnt/x")
        assert cache.put(layer, 0, data, _sha(data))
    finally:
        os.umask(old)
    for top, dirs, files in os.walk(tmp_path / "outside"):
        for name in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
            assert mode == 0o700, f"{top}/{name} is {mode:o}"
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
            assert mode == 0o600, f"{top}/{name} is {mode:o}"


def test_a_state_file_that_cannot_be_written_is_logged_once_and_serving_goes_on(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tar = make_tar(rich_members())
    index = built_index(tar, "tar")
    blob = tmp_path / "blob"
    blob.write_bytes(tar)
    mountpoint = small_disk / "fs"
    mountpoint.mkdir()
    spec = MountSpec(
        mountpoint=str(mountpoint),
        index_path="unused",
        blob=BlobSpec("file", str(blob), index.layer_digest),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 30,
    )
    reader = LayerReader(index, FileBlobSource(str(blob)), SpanCache(spec.cache_dir, 1 << 30))
    keeper = _StateKeeper(spec, reader, _Reporter(None), 0)
    filler = small_disk / "filler"
    with contextlib.suppress(OSError):
        filler.write_bytes(b"f" * (4 << 20))  # the disk is full now
    caplog.set_level(logging.INFO, logger="lazysnap.fs")
    for _ in range(3):
        keeper.write_state()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert not list(small_disk.glob("fs.lazysnap.json*")), "a temp file was left behind"
    big = next(e for e in index.entries if e.name == "usr/lib/big.bin")
    assert reader.read(big, 0, big.size) == tar[big.offset : big.offset + big.size]
    filler.unlink()
    keeper.write_state()
    state = read_state(str(mountpoint))
    assert state is not None and state["layer_digest"] == index.layer_digest
    assert stat.S_IMODE(state_path(str(mountpoint)).stat().st_mode) == 0o600
    assert any("written again" in r.getMessage() for r in caplog.records)
    reader.close()
