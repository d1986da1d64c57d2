"""Stress without FUSE: many threads reading through several LayerReaders of one blob (two
indexes of it, 1 MiB and 4 MiB spans) that share a span cache a few spans large, while prefetch
and background fetch run; every byte is compared with the tar. Needs neither root nor FUSE, so
the reader/cache races (in-flight futures, put vs eviction vs read, replaced spans) are hammered
on every run. LAZYSNAP_STRESS_SECONDS makes it longer (default 8 s)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from snapshotter.fs.background import BackgroundFetcher, BackgroundSettings
from snapshotter.fs.blob_source import FileBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from tests.stress.stress_layers import MiB, compress, index_for, make_stress_tar

SECONDS = min(float(os.environ.get("LAZYSNAP_STRESS_SECONDS", "8")), 600.0)
THREADS = 8


def _data_entries(index: LayerIndex) -> list[TocEntry]:
    return [e for e in index.entries if e.type is EntryType.REG]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pigz", "gzip", "zstd", "tar"])
def test_threads_reading_through_readers_sharing_a_tiny_cache_get_exact_bytes(
    kind: str, tmp_path: Path
) -> None:
    tar = make_stress_tar(7, small_files=120, large_sizes=(5 * MiB + 11, 2 * MiB))
    blob = compress(tar, kind)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    indexes = [index_for(blob, kind, size) for size in (MiB, 4 * MiB, 64 << 10)]
    largest = max(s.uncompressed_size for index in indexes for s in index.spans)
    cache_dir = tmp_path / "cache"
    # four readers (two mounts of the 1 MiB index, one of the 4 MiB and one of the 64 KiB index,
    # the profile tests' size), separate cache objects on one directory as mount processes have
    readers = [
        LayerReader(index, FileBlobSource(str(path)), SpanCache(cache_dir, 3 * largest))
        for index in (indexes[0], indexes[0], indexes[1], indexes[2])
    ]
    fast = BackgroundSettings(enabled=True, quiet_seconds=0.05, rate_bytes=1 << 30)
    fetchers = [BackgroundFetcher(reader, fast) for reader in readers]
    for reader, fetcher in zip(readers, fetchers, strict=True):
        reader.prefetch(range(0, len(reader.index.spans), 2))
        fetcher.start()
    failures: list[str] = []
    reads = [0] * THREADS
    deadline = time.monotonic() + SECONDS

    def hammer(number: int) -> None:
        rng = random.Random(number)
        while time.monotonic() < deadline and len(failures) < 10:
            reader = rng.choice(readers)
            entry = rng.choice(_data_entries(reader.index))
            edges = [
                s.uncompressed_start - entry.offset
                for s in reader.index.spans
                if entry.offset < s.uncompressed_start < entry.offset + entry.size
            ]
            if edges and rng.random() < 0.5:
                offset = max(0, rng.choice(edges) - rng.choice((0, 1, 4096, 70000)))
            else:
                offset = rng.randrange(entry.size + 2)
            size = rng.choice((1, 4096, 131072, 1 << 20, 3 << 20))
            got = reader.read(entry, offset, size)
            start = entry.offset + min(offset, entry.size)
            want = tar[start : entry.offset + min(offset + size, entry.size)]
            reads[number] += 1
            if got != want:
                failures.append(
                    f"{entry.name} [{offset}:+{size}] via {reader.index.span_size} byte spans: "
                    f"{len(got)} bytes, expected {len(want)}"
                )

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for fetcher in fetchers:
            fetcher.stop()
        for fetcher in fetchers:
            fetcher.join(10)
        for reader in readers:
            reader.close()
    assert not failures, failures
    assert sum(reads) > 100
    counters = [reader.counters() for reader in readers]
    assert not any(c.fetch_errors for c in counters), counters
    assert SpanCache(cache_dir, 3 * largest).usage().bytes <= 3 * largest
