"""Reading a root for `lazysnap status` (and the daemon's metrics): each fact through the query
of the module that owns its file (see the package's docstring), put together as a RootStatus."""

from __future__ import annotations

import os
from dataclasses import asdict

from snapshotter.config import Config
from snapshotter.core.fallbacks import Fallback, read_fallbacks
from snapshotter.core.layout import metadata_path, snapshot_id_of, snapshots_dir, upper_dir
from snapshotter.core.metadata import MetadataError, read_snapshots
from snapshotter.fs.cache_census import cache_usage, layer_spans_cached
from snapshotter.fs.mount_spec import index_facts
from snapshotter.lazylayers.deaths import mount_table, read_record
from snapshotter.lazylayers.mount_checks import mount_problem, process_alive
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.root_lock import lock_holder
from snapshotter.sidecars import (
    failure_reason,
    mountpoints_with_state,
    read_marker,
    read_mount_state,
    read_verdict,
)
from snapshotter.status.model import (
    LOCAL,
    REFUSED,
    TOC_ONLY,
    UNMOUNTED,
    VERIFIED,
    CacheStatus,
    DaemonStatus,
    LayerStatus,
    LazyMount,
    RootStatus,
    StatusError,
)
from snapshotter.vocabulary.labels import is_remote, layer_digest_of


def lazy_mounts(root: str) -> list[LazyMount]:
    """Every mount process state file under ROOT/snapshots, with its liveness.

    Only ROOT/snapshots/*/ is looked at (where the core puts lazy layers): walking deeper would
    read whole unpacked layers, and enter lazy mounts."""
    found = []
    for mountpoint in mountpoints_with_state(snapshots_dir(root)):
        state = read_mount_state(mountpoint)
        if state is None:  # being replaced right now, or damaged: nothing to show
            continue
        found.append(
            LazyMount(
                mountpoint=mountpoint,
                snapshot_id=snapshot_id_of(root, mountpoint),
                layer_digest=state.layer_digest,
                pid=state.pid,
                problem=mount_problem(mountpoint),
                updated_at=state.updated_at,
                cache_dir=state.cache_dir,
                background=state.background,
                cache_disk_limited=state.cache_disk_limited,
                pack=state.pack,
                counters=state.counters,
            )
        )
    return found


def cache_status(cache_dir: str, max_bytes: int) -> CacheStatus:
    """Bytes and spans in the cache. A cache that does not exist yet is empty (and is not
    created: status only reads)."""
    usage = cache_usage(cache_dir, max_bytes)
    return CacheStatus(cache_dir, usage.bytes, usage.spans, max_bytes)


def daemon_status(root: str) -> DaemonStatus:
    holder = lock_holder(root)
    return DaemonStatus(holder.path, holder.pid, holder.held)


def collect_status(config: Config) -> RootStatus:
    """Everything `lazysnap status` shows for config.root; StatusError if it is not there."""
    root = os.path.abspath(config.root)
    if not os.path.isdir(root):
        raise StatusError(f"lazysnap root {root} does not exist (or is not a directory)")
    snapshots = _remote_snapshots(root)
    mounts = {m.mountpoint: m for m in lazy_mounts(root)}
    layers = []
    for snapshot_id, (name, digest) in sorted(snapshots.items()):
        mountpoint = upper_dir(root, snapshot_id)
        mount = mounts.pop(mountpoint, None)
        layers.append(_layer_status(config, mountpoint, snapshot_id, name, digest, mount))
    for mountpoint, mount in sorted(mounts.items()):  # state files no lazy snapshot owns
        layers.append(
            _layer_status(config, mountpoint, mount.snapshot_id, "", mount.layer_digest, mount)
        )
    ledger = RefusalLedger(root)
    return RootStatus(
        root=root,
        daemon=daemon_status(root),
        cache=cache_status(config.cache_dir, config.cache.max_size_bytes),
        layers=layers,
        not_lazy=_not_lazy(root, {layer.layer_digest for layer in layers}),
        refused_indexes=[asdict(entry) for entry in ledger.refusals()],
        completion_checks=ledger.counts(),
    )


def _not_lazy(root: str, lazy_digests: set[str]) -> list[Fallback]:
    """The newest recorded fallback of each layer that is not lazy now, newest first."""
    newest: dict[str, Fallback] = {}
    for entry in read_fallbacks(root):  # oldest first: later entries replace earlier ones
        name = entry.layer_digest or entry.target
        if name not in lazy_digests:
            newest.pop(name, None)
            newest[name] = entry
    return list(reversed(newest.values()))


def _layer_status(
    config: Config,
    mountpoint: str,
    snapshot_id: int | None,
    name: str,
    digest: str,
    mount: LazyMount | None,
) -> LayerStatus:
    counters = mount.counters if mount else {}
    digest = (mount.layer_digest if mount else "") or digest
    facts = index_facts(mountpoint)
    cache_dir = (mount.cache_dir if mount else "") or config.cache_dir
    marker = read_marker(mountpoint)
    local_since = None if marker is None else marker.materialized_at
    pid = mount.pid if mount else None
    check, check_detail = _completion_check(mountpoint)
    if local_since is not None:
        state, problem = LOCAL, ""
        # The detached mount's process still runs for containers started before, or is gone.
        pid = pid if mount is not None and process_alive(pid) else None
    elif mount is None:
        state, problem = UNMOUNTED, "no mount process (no state file)"
    else:
        state, problem = mount.state, mount.problem or ""
    deaths = read_record(mountpoint)
    stranded = deaths.stranded_now(mount_table()) if deaths.count else []
    return LayerStatus(
        layer_digest=digest,
        snapshot_id=snapshot_id,
        snapshot_name=name,
        mountpoint=mountpoint,
        state=state,
        problem=problem,
        pid=pid,
        layer_size=facts.layer_size if facts else None,
        bytes_fetched=counters.get("bytes_fetched", 0),
        spans_total=facts.spans if facts else None,
        spans_cached=layer_spans_cached(cache_dir, digest),
        cache_hits=counters.get("cache_hits", 0),
        read_errors=counters.get("fetch_errors", 0),
        eio=counters.get("eio"),
        background=mount.background if mount else "",
        updated_at=mount.updated_at if mount else None,
        local_since=local_since,
        deaths=deaths.count,
        last_death_at=deaths.last[-1].noticed_at if deaths.last else None,
        stranded=tuple(s.name() for s in stranded),
        bytes_verified=counters.get("bytes_verified"),
        degraded_spans=counters.get("degraded_spans", 0),
        materialize_failed=failure_reason(mountpoint) if local_since is None else "",
        cache_disk_limited=mount.cache_disk_limited if mount else False,
        completion_check=check,
        check_detail=check_detail,
        pack=mount.pack if mount else "",
        pack_bytes=counters.get("pack_bytes", 0),
        pack_reads=counters.get("pack_reads", 0),
    )


def _completion_check(mountpoint: str) -> tuple[str, str]:
    verdict = read_verdict(mountpoint)
    if verdict is None:
        return "", ""
    if verdict.failed:
        return REFUSED, verdict.detail
    return (VERIFIED if verdict.diff_id else TOC_ONLY), verdict.detail


def _remote_snapshots(root: str) -> dict[int, tuple[str, str]]:
    """id -> (name, layer digest) of every lazy snapshot in ROOT/metadata.db, read-only."""
    try:
        records = read_snapshots(metadata_path(root))
    except MetadataError as err:
        raise StatusError(str(err)) from None
    return {r.id: (r.key, layer_digest_of(r.labels)) for r in records if is_remote(r.labels)}
