"""Everything the daemon's lazy layers are told, once: one frozen value built from the config.

The mount processes get their part through each layer's spec (fs/mount_process.MountSpec);
the supervisor and the materializer read the rest. Defaults are what a test or a tool that
mounts a layer by itself wants (wait for each mount, no zygote, no copies); from_config() is
what the daemon runs with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from snapshotter.config import Config
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.disk_reserve import NO_RESERVE, DiskReserve
from snapshotter.fs.mount_spec import OOM_SCORE_ADJ, READ_AHEAD_KB, START_READ_AHEAD_KB
from snapshotter.fs.reader import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_READ_AHEAD_SPANS,
    DEFAULT_READ_AROUND_SCOPE,
    DEFAULT_WORKERS,
)

DEFAULT_READY_TIMEOUT_S = 30.0
MATERIALIZE_RETRY_S = 60.0  # after a failed copy; doubles up to materializer's maximum


@dataclass(frozen=True)
class LazyLayerSettings:
    cache_dir: str
    cache_max_bytes: int
    cache_reserve: DiskReserve = NO_RESERVE
    # For each mount process (its spec):
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    workers: int = DEFAULT_WORKERS
    allow_other: bool = True
    read_ahead_kb: int = READ_AHEAD_KB
    start_read_ahead_kb: int = START_READ_AHEAD_KB
    read_ahead_spans: int = DEFAULT_READ_AHEAD_SPANS
    read_around_bytes: int = 0
    read_around_scope: str = DEFAULT_READ_AROUND_SCOPE
    prefetch: bool = True
    background: BackgroundSettings = field(default_factory=BackgroundSettings)
    oom_score_adj: int = OOM_SCORE_ADJ
    # For the supervisor:
    python: str = sys.executable  # the interpreter mount processes and helpers run on
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S
    # mount() returns once the process is started; check() waits for it (the daemon's way).
    mount_in_background: bool = False
    zygote: bool = False  # fork mount processes from a pre-started one (fs/zygote.py)
    # For the materializer: copy complete layers into plain files.
    materialize: bool = False
    materialize_retry_s: float = MATERIALIZE_RETRY_S

    @classmethod
    def from_config(cls, config: Config) -> LazyLayerSettings:
        """The daemon's settings."""
        return cls(
            cache_dir=config.cache_dir,
            cache_max_bytes=config.cache.max_size_bytes,
            cache_reserve=DiskReserve(config.cache.min_free_bytes, config.cache.min_free_percent),
            fetch_timeout=config.remote.fetch_timeout_seconds,
            read_ahead_kb=config.fuse.read_ahead_kb,
            start_read_ahead_kb=config.fuse.start_read_ahead_kb,
            read_ahead_spans=config.fetch.read_ahead_spans,
            read_around_bytes=config.fetch.read_around_bytes,
            read_around_scope=config.fetch.read_around_scope,
            prefetch=config.fetch.prefetch,
            background=BackgroundSettings(
                enabled=config.fetch.background,
                quiet_seconds=config.fetch.background_quiet_seconds,
                rate_bytes=config.fetch.background_rate_bytes,
            ),
            mount_in_background=True,  # the core waits in check() before a mount is used
            materialize=config.fetch.materialize and config.fetch.background,
            zygote=config.fuse.zygote,
            oom_score_adj=config.fuse.oom_score_adj,
        )
