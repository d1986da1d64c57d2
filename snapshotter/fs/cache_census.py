"""What a span cache (fs/cache.py) holds, for `lazysnap status` and the daemon's metrics: queries
that only look. A cache directory that does not exist yet is empty, and is not created.
layer_spans_cached() counts one layer's files in cache.py's layout,
spans/<algorithm>/<hex>/<span number>, without opening the cache (one scandir per layer)."""

from __future__ import annotations

import os

from snapshotter.fs.cache import CacheUsage, SpanCache


def cache_usage(cache_dir: str, max_bytes: int) -> CacheUsage:
    """Bytes and span files in the cache (a scan); nothing if the directory is not there."""
    if not os.path.isdir(cache_dir):
        return CacheUsage(bytes=0, spans=0)
    return SpanCache(cache_dir, max_bytes).usage()


def layer_spans_cached(cache_dir: str, layer_digest: str) -> int:
    """How many spans of the layer the cache holds now (0 for a digest it cannot hold)."""
    algorithm, _, hex_digest = layer_digest.partition(":")
    if not hex_digest or "/" in layer_digest:
        return 0
    try:
        with os.scandir(os.path.join(cache_dir, "spans", algorithm, hex_digest)) as entries:
            return sum(1 for entry in entries if entry.name.isdigit())
    except OSError:
        return 0
