"""The span cache: atomic, bounded, LRU, shared by processes, and never confusing the spans of two
indexes of one blob."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapshotter.fs.cache import HEADER_SIZE, SpanCache
from snapshotter.fs.cache_errors import CacheError

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(cache: SpanCache, layer: str, span: int, data: bytes) -> bool:
    return cache.put(layer, span, data, _sha(data))


def _read(cache: SpanCache, layer: str, span: int, data: bytes, offset: int = 0) -> bytes | None:
    """Read back the rest of `data` (what the caller's index says span `span` holds)."""
    return cache.read(layer, span, offset, len(data) - offset, len(data), _sha(data))


def test_put_then_read_returns_the_slice(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 20)
    data = bytes(range(100))
    assert _read(cache, DIGEST, 0, data) is None
    assert _put(cache, DIGEST, 0, data)
    assert cache.read(DIGEST, 0, 10, 5, 100, _sha(data)) == bytes([10, 11, 12, 13, 14])
    assert cache.read(DIGEST, 0, 100, 0, 100, _sha(data)) == b""
    assert cache.usage().bytes == 100 + HEADER_SIZE and cache.usage().spans == 1


def test_another_index_numbering_spans_differently_gets_a_miss_not_its_bytes(
    tmp_path: Path,
) -> None:
    # Two indexes of one blob (1 MiB and 4 MiB spans) both have a span 1 of the same size but
    # with other bytes: the second must not be served the first one's.
    cache = SpanCache(tmp_path, 1 << 20)
    one, four = b"1" * 1000, b"4" * 1000
    assert _put(cache, DIGEST, 1, one)
    assert _read(cache, DIGEST, 1, four) is None
    assert not cache.contains(DIGEST, 1, _sha(four))
    assert cache.contains(DIGEST, 1, _sha(one))
    assert _put(cache, DIGEST, 1, four)  # the second index's fetch replaces it
    assert _read(cache, DIGEST, 1, four) == four
    assert _read(cache, DIGEST, 1, one) is None
    assert cache.usage().spans == 1 and cache.approximate_usage().spans == 1
    assert cache.approximate_usage().bytes == cache.usage().bytes == 1000 + HEADER_SIZE


def test_a_file_of_the_wrong_size_is_a_miss_and_is_dropped(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 20)
    _put(cache, DIGEST, 3, b"x" * 50)
    assert cache.read(DIGEST, 3, 0, 10, 60, _sha(b"x" * 60)) is None
    assert not cache.contains(DIGEST, 3)


def test_a_span_file_of_the_old_headerless_layout_is_dropped(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1 << 20)
    data = b"old format" * 10
    path = cache.span_path(DIGEST, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert _read(cache, DIGEST, 0, data) is None
    assert not path.exists()


def test_a_span_whose_bytes_do_not_match_its_header_is_a_miss_and_is_dropped(
    tmp_path: Path,
) -> None:
    # What a power loss after the rename but before writeback, or a damaged disk, leaves.
    data = bytes(range(256)) * 40
    _put(SpanCache(tmp_path, 1 << 20), DIGEST, 0, data)
    path = SpanCache(tmp_path, 1 << 20).span_path(DIGEST, 0)
    damaged = bytearray(path.read_bytes())
    damaged[HEADER_SIZE + 5000] ^= 1
    path.write_bytes(damaged)
    other_process = SpanCache(tmp_path, 1 << 20)  # has not read the file yet
    assert _read(other_process, DIGEST, 0, data) is None
    assert not path.exists()
    _put(other_process, DIGEST, 0, data)
    assert _read(SpanCache(tmp_path, 1 << 20), DIGEST, 0, data, offset=4000) == data[4000:]


def test_least_recently_used_spans_are_evicted_first(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 3 * (1000 + HEADER_SIZE))
    for span in range(3):
        _put(cache, DIGEST, span, bytes(1000))
        _age(cache.span_path(DIGEST, span), seconds=100 - span)
    _read(cache, DIGEST, 0, bytes(1000))  # span 0 is now the most recently used
    _put(cache, OTHER, 0, bytes(1000))
    assert cache.contains(DIGEST, 0) and not cache.contains(DIGEST, 1)
    assert cache.contains(DIGEST, 2) and cache.contains(OTHER, 0)
    assert cache.usage().bytes <= cache.max_bytes


def test_a_span_larger_than_the_cache_is_not_stored(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 100)
    assert not _put(cache, DIGEST, 0, bytes(101 - HEADER_SIZE))
    assert cache.usage().spans == 0
    assert cache.stored_size(100 - HEADER_SIZE) == 100
    assert _put(cache, DIGEST, 0, bytes(100 - HEADER_SIZE))


def test_an_open_reader_survives_eviction(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 1000 + HEADER_SIZE)
    _put(cache, DIGEST, 0, b"a" * 1000)
    with open(cache.span_path(DIGEST, 0), "rb") as held:
        _put(cache, DIGEST, 1, b"b" * 1000)  # evicts span 0 while it is open
        assert not cache.contains(DIGEST, 0)
        assert held.read()[HEADER_SIZE:] == b"a" * 1000


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
        "import hashlib, sys\n"
        "from snapshotter.fs.cache import SpanCache\n"
        f"cache = SpanCache({str(tmp_path)!r}, {limit})\n"
        "digest = 'sha256:' + sys.argv[1] * 64\n"
        "data = bytes(3000)\n"
        "for span in range(40):\n"
        "    cache.put(digest, span, data, 'sha256:' + hashlib.sha256(data).hexdigest())\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, c]) for c in "0123"]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    usage = SpanCache(tmp_path, limit).usage()
    assert 0 < usage.bytes <= limit
    assert not list((tmp_path / "tmp").iterdir())


def test_bad_keys_and_limits_name_the_problem(tmp_path: Path) -> None:
    cache = SpanCache(tmp_path, 10)
    with pytest.raises(CacheError, match=r"'../../etc' is not a digest"):
        cache.put("../../etc", 0, b"x", _sha(b"x"))
    with pytest.raises(CacheError, match=r"'md5:00' is not a sha256 digest"):
        cache.put(DIGEST, 0, b"x", "md5:00")
    with pytest.raises(CacheError, match=r"outside span 2 of sha256:abab"):
        cache.read(DIGEST, 2, 5, 10, 12, _sha(b"x"))
    with pytest.raises(CacheError, match="max_bytes must be positive"):
        SpanCache(tmp_path, 0)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))
