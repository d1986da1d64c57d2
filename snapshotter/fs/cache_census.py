"""What a span cache (fs/cache.py) holds, for `lazysnap status` and the daemon's metrics: queries
that only look. A cache directory that does not exist yet is empty, and is not created.
layer_spans_cached() counts one layer's span files in the directory cache.py names for it,
without opening the cache (one scandir per layer)."""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.fs.cache import CacheUsage, SpanCache, layer_directory
from snapshotter.fs.cache_errors import CacheError


def cache_usage(cache_dir: str, max_bytes: int) -> CacheUsage:
    """Bytes and span files in the cache (a scan); nothing if the directory is not there."""
    if not os.path.isdir(cache_dir):
        return CacheUsage(bytes=0, spans=0)
    return SpanCache(cache_dir, max_bytes).usage()


def layer_spans_cached(cache_dir: str, layer_digest: str) -> int:
    """How many spans of the layer the cache holds now (0 for a digest it cannot hold)."""
    try:
        directory = layer_directory(Path(cache_dir) / "spans", layer_digest)
    except CacheError:
        return 0
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if entry.name.isdigit())
    except OSError:
        return 0
