"""Mounting one layer whose spec carries a start-up profile, the way the profile tests in
tests/profile and tests/indexer watch its prefetch: a LazyLayers of its own with background
fetching off (so every span the mount fetched before a read is the profile's), and the mount
process's counters read from its state file (as `lazysnap status` reads them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapshotter import sidecars
from snapshotter.fs.background import BackgroundSettings
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings

# The state file is rewritten every 2 s; a prefetch of a few files over loopback takes less.
PREFETCH_TIMEOUT_S = 20.0


@contextmanager
def mounted_without_background(
    spec: LayerSpec, work: Path, fetch_timeout: float = 5
) -> Iterator[Path]:
    """The layer of spec mounted at work/mnt (its span cache in work/cache) with no
    background fetching; unmounted and closed on the way out."""
    lazy = LazyLayers(
        LazyLayerSettings(
            str(work / "cache"),
            1 << 30,
            fetch_timeout=fetch_timeout,
            background=BackgroundSettings(enabled=False),
        )
    )
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        lazy.mount_layer(str(mnt), spec)
        try:
            yield mnt
        finally:
            lazy.unmount(str(mnt))
    finally:
        lazy.close()


def prefetch_spans(mnt: Path) -> int:
    """Spans the mount process has fetched for its profile, as its state file last said."""
    counters = (sidecars.read_state(str(mnt)) or {}).get("counters", {})
    assert isinstance(counters, dict)
    count = counters.get("prefetch_spans", 0)
    assert isinstance(count, int)
    return count


def wait_for_prefetch(mnt: Path, timeout: float = PREFETCH_TIMEOUT_S) -> int:
    """Spans prefetched for the profile once the state file shows any (0 if it does not
    within timeout seconds)."""
    deadline = time.monotonic() + timeout
    while (count := prefetch_spans(mnt)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return count
