"""The span cache's bound holds for what is on disk at every moment, spans being written
included: several processes filling one cache, a writer that dies holding room, a disk that
fills up mid-put."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fs.cache import HEADER_SIZE, SpanCache

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4096


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def _bytes_on_disk(cache_dir: Path) -> int:
    """Bytes of span files and temp files, taken under the cache's lock as any cache user
    would see them (a span never counts twice while it moves from tmp/ to spans/)."""
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total = 0
        for top, _, names in os.walk(cache_dir):
            if top == str(cache_dir):
                continue  # lock and ledger: bookkeeping, not spans
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(top, name)).st_size
        return total
    finally:
        os.close(fd)


WRITER = """
import hashlib, sys
from snapshotter.fs.cache import SpanCache
directory, layer = sys.argv[1], sys.argv[3]
limit, spans, size = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
cache = SpanCache(directory, limit)
stored = 0
for span in range(spans):
    data = hashlib.sha256(f"{layer} {span}".encode()).digest() * (size // 32)
    stored += cache.put(layer, span, data, "sha256:" + hashlib.sha256(data).hexdigest())
print(stored)
"""


def test_processes_filling_one_cache_never_take_more_than_its_limit_even_mid_write(
    tmp_path: Path,
) -> None:
    # 256 KiB spans (block-aligned with their header) and room for 8 of them: 4 processes
    # each storing 40 spans keep evicting, with up to 4 spans being written at any time.
    span_bytes = 64 * BLOCK - HEADER_SIZE
    span_bytes -= span_bytes % 32
    limit = 8 * (HEADER_SIZE + span_bytes)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_bytes_on_disk(tmp_path))

    SpanCache(tmp_path, limit)
    writer = (sys.executable, "-c", WRITER)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        writers = [
            subprocess.Popen(
                [*writer, str(tmp_path), str(limit), _layer(name), "40", str(span_bytes)],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in "abcd"
        ]
        outputs = [w.communicate(timeout=120)[0] for w in writers]
    finally:
        done.set()
        sampler.join()
    assert [w.returncode for w in writers] == [0, 0, 0, 0]
    assert sum(int(out) for out in outputs) >= 40, outputs  # most puts found room
    assert len(samples) > 20, "the sampler never looked while the writers ran"
    assert max(samples) <= limit, f"cache held {max(samples)} bytes > limit {limit}"
    cache = SpanCache(tmp_path, limit)
    assert 0 < cache.usage().bytes <= limit
    assert cache.approximate_usage().bytes >= cache.usage().bytes  # the ledger never under-counts
    assert not [p for p in (tmp_path / "tmp").iterdir()], "a reservation was left behind"


DIES_HOLDING_ROOM = """
import os, sys
from snapshotter.fs.cache import SpanCache
cache = SpanCache(sys.argv[1], int(sys.argv[2]))
path = cache.span_path(sys.argv[3], 0)
cache._reserve(path, b"lzspan1\\0" + bytes(32), int(sys.argv[4]))
os._exit(0)  # as if killed between taking room for a span and storing it
"""


def test_room_held_by_a_writer_that_died_is_given_back(tmp_path: Path) -> None:
    limit = 10 * BLOCK
    cache = SpanCache(tmp_path, limit)
    kept = b"k" * (4 * BLOCK - HEADER_SIZE)
    assert cache.put(_layer("kept"), 0, kept, _sha(kept))
    dying = (sys.executable, "-c", DIES_HOLDING_ROOM)
    subprocess.run(
        [*dying, str(tmp_path), str(limit), _layer("dead"), str(5 * BLOCK)],
        cwd=REPO_ROOT,
        check=True,
    )
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # its reservation, 5 blocks
    new = b"n" * (4 * BLOCK - HEADER_SIZE)
    assert cache.put(_layer("new"), 0, new, _sha(new))
    # the dead writer's room went to the new span, and nothing that fitted was evicted
    assert cache.contains(_layer("kept"), 0, _sha(kept))
    assert cache.contains(_layer("new"), 0, _sha(new))
    assert not list((tmp_path / "tmp").iterdir())
    assert cache.approximate_usage().bytes == cache.usage().bytes == 8 * BLOCK


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = Path(tempfile.mkdtemp(prefix="lazysnap-small-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


def test_a_put_that_fills_the_disk_fails_cleanly_and_gives_its_room_back(
    small_disk: Path,
) -> None:
    cache = SpanCache(small_disk, 1 << 20)  # the limit allows what the disk does not
    big = b"b" * (128 << 10)
    assert not cache.put(_layer("big"), 0, big, _sha(big))  # served uncached, no error
    assert not cache.contains(_layer("big"), 0)
    assert not list((small_disk / "tmp").iterdir()), "half a span left in tmp/"
    small = b"s" * 1000
    assert cache.put(_layer("small"), 0, small, _sha(small))
    assert cache.approximate_usage().bytes == cache.usage().bytes == HEADER_SIZE + 1000
