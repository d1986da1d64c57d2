"""What `lazysnap status` shows, as data: one root's daemon, cache and lazy layers (collect.py
fills it in, render.py prints it, `--json` prints RootStatus.to_json())."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from snapshotter.core.fallbacks import Fallback

LIVE = "live"  # mounted, answering, its mount process alive
DEAD = "dead"  # a mount or state file is there, but nothing serves it
UNMOUNTED = "unmounted"  # a lazy snapshot whose layer is not mounted at all
LOCAL = "local"  # copied into plain files (materialized): no FUSE for new containers
# The completion check's verdict on a layer, as shown.
VERIFIED = "verified"  # the tar stream matched the diffID and the index's TOC
TOC_ONLY = "toc-only"  # matched the TOC; no diffID was known, so the layer stays lazy
REFUSED = "refused"  # failed: the index is refused on this node, reads get EIO


class StatusError(Exception):
    """The root cannot be inspected; the message names the path."""


@dataclass(frozen=True)
class LazyMount:
    """One mount process's state file, and whether its mount is usable."""

    mountpoint: str
    snapshot_id: int | None  # the <id> of ROOT/snapshots/<id>/fs
    layer_digest: str
    pid: int | None
    problem: str | None  # None: live; else why not (from lazylayers.mount_checks.mount_problem)
    updated_at: float | None  # when the process last wrote its counters
    cache_dir: str
    counters: dict[str, int] = field(default_factory=dict)
    # background fetch: off|waiting|fetching|complete|degraded|cache-full|stopped
    background: str = ""
    cache_disk_limited: bool = False  # spans served uncached: the cache's disk is at its reserve
    pack: str = ""  # the start-up pack's state (fs/pack_store.PackState); "" without one

    @property
    def state(self) -> str:
        if self.problem is None:
            return LIVE
        return UNMOUNTED if self.problem == "not mounted" else DEAD


@dataclass(frozen=True)
class LayerStatus:
    layer_digest: str
    snapshot_id: int | None
    snapshot_name: str  # the committed snapshot (containerd's chain ID key); "" if unknown
    mountpoint: str
    state: str  # LIVE | DEAD | UNMOUNTED | LOCAL
    problem: str  # why it is not live; "" when live or local
    # LIVE: the mount process; LOCAL: the detached FUSE mount's process, while containers
    # started before the layer went local still use it (None once they are gone)
    pid: int | None
    layer_size: int | None  # compressed bytes, from the index; None if the index is unreadable
    bytes_fetched: int  # by the current mount process (counters restart with the process)
    spans_total: int | None
    spans_cached: int  # in the cache now (survives restarts, shrinks on eviction)
    cache_hits: int
    read_errors: int  # spans whose fetch or verification failed (each an EIO to a reader)
    eio: int | None  # EIOs returned, when the mount process reports them separately
    background: str  # the mount process's background fetch state; "" if it reports none
    updated_at: float | None
    local_since: float | None = None  # when the layer went local (time.time()); None: lazy
    # Its mount processes that died under their mount (deaths.py), the last one's time, and
    # the mounts (containers) still on a dead connection: they must be restarted.
    deaths: int = 0
    last_death_at: float | None = None
    stranded: tuple[str, ...] = ()
    # compressed bytes of distinct spans verified by the current mount process (None: a mount
    # process that does not report it)
    bytes_verified: int | None = None
    degraded_spans: int = 0  # spans background fetch gave up on (their bytes never verify)
    materialize_failed: str = ""  # why copying the layer to plain files gave up; "" if it did not
    cache_disk_limited: bool = False  # spans served uncached: the cache's disk is at its reserve
    # The completion check (snapshotter.lazylayers.completion): VERIFIED, TOC_ONLY, REFUSED, or ""
    # while not checked yet; check_detail says what it compared, or what differed.
    completion_check: str = ""
    check_detail: str = ""
    # The start-up pack (docs/startup-profile.md): its state ("" without one), compressed
    # bytes received, reads it served.
    pack: str = ""
    pack_bytes: int = 0
    pack_reads: int = 0

    @property
    def fetched_percent(self) -> float | None:
        """Share of the layer's compressed bytes this mount process fetched and verified: never
        above 100, however often a span was fetched again (a failed try, an eviction)."""
        if not self.layer_size:
            return None
        fetched = self.bytes_fetched if self.bytes_verified is None else self.bytes_verified
        return min(100.0, 100.0 * fetched / self.layer_size)


@dataclass(frozen=True)
class CacheStatus:
    dir: str
    bytes: int
    spans: int
    max_bytes: int


@dataclass(frozen=True)
class DaemonStatus:
    lock_path: str
    pid: int | None  # from the lock file; None if it holds none
    running: bool  # the lock is held, so a daemon serves this root


@dataclass(frozen=True)
class RootStatus:
    root: str
    daemon: DaemonStatus
    cache: CacheStatus
    layers: list[LayerStatus]
    # The last fallback of each layer that was pulled whole instead of mounted lazily, newest
    # first (a layer lazy again since is not listed).
    not_lazy: list[Fallback] = field(default_factory=list)
    # The node's completion-check ledger: index blobs refused here, and checks passed/failed.
    refused_indexes: list[dict[str, Any]] = field(default_factory=list)
    completion_checks: dict[str, int] = field(default_factory=dict)

    @property
    def all_local(self) -> bool:
        """Every lazy layer of this root is local (vacuously true without lazy layers)."""
        return all(layer.state == LOCAL for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers_local"] = sum(1 for layer in self.layers if layer.state == LOCAL)
        data["all_local"] = self.all_local
        for layer, status in zip(data["layers"], self.layers, strict=True):
            percent = status.fetched_percent
            layer["fetched_percent"] = None if percent is None else round(percent, 2)
        return data
