"""The span cache: atomic, bounded, LRU, shared by processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapshotter.fs.cache import CacheError, SpanCache

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def test_put_then_read_returns_the_slice(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 20)
    assert cache.read(DIGEST, 0, 0, 10, 100) is None
    assert cache.put(DIGEST, 0, bytes(range(100)))
    assert cache.read(DIGEST, 0, 10, 5, 100) == bytes([10, 11, 12, 13, 14])
    assert cache.usage().bytes == 100 and cache.usage().spans == 1


def test_a_file_of_the_wrong_size_is_a_miss_and_is_dropped(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 20)
    cache.put(DIGEST, 3, b"x" * 50)
    assert cache.read(DIGEST, 3, 0, 10, 60) is None
    assert not cache.contains(DIGEST, 3)


def test_least_recently_used_spans_are_evicted_first(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 3000)
    for span in range(3):
        cache.put(DIGEST, span, bytes(1000))
        _age(cache.span_path(DIGEST, span), seconds=100 - span)
    cache.read(DIGEST, 0, 0, 1, 1000)  # span 0 is now the most recently used
    cache.put(OTHER, 0, bytes(1000))
    assert cache.contains(DIGEST, 0) and not cache.contains(DIGEST, 1)
    assert cache.contains(DIGEST, 2) and cache.contains(OTHER, 0)
    assert cache.usage().bytes <= 3000


def test_a_span_larger_than_the_cache_is_not_stored(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 100)
    assert not cache.put(DIGEST, 0, bytes(101))
    assert cache.usage().spans == 0


def test_an_open_reader_survives_eviction(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1000)
    cache.put(DIGEST, 0, b"a" * 1000)
    with open(cache.span_path(DIGEST, 0), "rb") as held:
        cache.put(DIGEST, 1, b"b" * 1000)  # evicts span 0 while it is open
        assert not cache.contains(DIGEST, 0)
        assert held.read() == b"a" * 1000


def test_temp_files_of_dead_writers_are_removed_and_never_visible(tmp_path: Path) -> None:
    SpanCache(tmp_path, 1000)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    leftover = tmp_path / "tmp" / f"{dead.stdout.strip()}.deadbeef"
    leftover.write_bytes(b"half a span")
    cache = SpanCache(tmp_path, 1000)
    assert not leftover.exists()
    assert cache.usage().spans == 0


def test_processes_sharing_the_cache_keep_it_under_its_limit(tmp_path: Path) -> None:
    limit = 40_000
    script = (
        "import sys\n"
        "from snapshotter.fs.cache import SpanCache\n"
        f"cache = SpanCache({str(tmp_path)!r}, {limit})\n"
        "digest = 'sha256:' + sys.argv[1] * 64\n"
        "for span in range(40):\n"
        "    cache.put(digest, span, bytes(3000))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, c]) for c in "0123"]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    usage = SpanCache(tmp_path, limit).usage()
    assert 0 < usage.bytes <= limit
    assert not list((tmp_path / "tmp").iterdir())


def test_bad_keys_and_limits_name_the_problem(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 10)
    with pytest.raises(CacheError, match=r"'../../etc' is not a digest"):
        cache.put("../../etc", 0, b"x")
    with pytest.raises(CacheError, match="max_bytes must be positive"):
        SpanCache(tmp_path, 0)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))
