"""`lazysnap status`: what a lazysnap root holds right now, read from disk (no RPC).

It works while `serve` is down because everything it shows is on disk beside the daemon:
    ROOT/lock                            the daemon's pid; the kernel's flock table says if it
                                         is still held (so: alive)
    ROOT/metadata.db                     which snapshots are lazy (label
                                         containerd.io/snapshot/remote), read-only
                                         (snapshotter.core.metadata.read_snapshots)
    ROOT/snapshots/<id>/fs.lazysnap.json state file of the mount process serving <id>/fs
    ROOT/snapshots/<id>/fs.lazysnap-spec.json -> the index (layer size, span count)
    ROOT/snapshots/<id>/fs.lazysnap-local marker: the layer was copied into plain files and its
                                         FUSE mount detached (snapshotter.lazylayers.copy_helper)
    ROOT/fallbacks.json                  why recent layers were pulled whole instead
                                         (snapshotter.core.fallbacks)
    ROOT/snapshots/<id>/fs.lazysnap-deaths.json  deaths of its mount processes, and the
                                         containers each stranded (snapshotter.lazylayers.deaths)
    ROOT/snapshots/<id>/fs.lazysnap-materialize-failed  why copying it gave up (JSON)
    ROOT/snapshots/<id>/fs.lazysnap-check the completion check's verdict on the layer
    ROOT/completion-ledger.json          index blobs refused on this node, check counts
                                         (snapshotter.sidecars, lazylayers/refusals.py;
                                         standard library only)
    the cache directory                  spans/<algorithm>/<hex>/<span number>

Imports only the standard library and the config at module level: `lazysnap` builds every
subcommand's parser on each start, and `serve` must not load FUSE or index code for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from snapshotter.core.fallbacks import Fallback, read_fallbacks
from snapshotter.vocabulary.labels import is_remote, layer_digest_of

STATE_SUFFIX = ".lazysnap.json"
SPEC_SUFFIX = ".lazysnap-spec.json"
LOCAL_SUFFIX = ".lazysnap-local"  # as snapshotter.lazylayers.copy_helper writes it
MATERIALIZE_FAILED_SUFFIX = ".lazysnap-materialize-failed"  # ditto

LIVE = "live"  # mounted, answering, its mount process alive
DEAD = "dead"  # a mount or state file is there, but nothing serves it
UNMOUNTED = "unmounted"  # a lazy snapshot whose layer is not mounted at all
LOCAL = "local"  # copied into plain files (materialized): no FUSE for new containers
SHOWN_FALLBACKS = 20  # the table lists this many layers that were not lazy, newest first
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


# -- reading the root ------------------------------------------------------------------------


def lazy_mounts(root: str) -> list[LazyMount]:
    """Every mount process state file under ROOT/snapshots, with its liveness.

    Only ROOT/snapshots/*/ is looked at (where the core puts lazy layers): walking deeper would
    read whole unpacked layers, and enter lazy mounts."""
    from snapshotter.lazylayers.mount_checks import mount_problem  # FUSE-free, loads fs/

    found = []
    for state_path in sorted(Path(root, "snapshots").glob(f"*/*{STATE_SUFFIX}")):
        state = _read_json(state_path)
        if state is None:  # being replaced right now, or damaged: nothing to show
            continue
        mountpoint = str(state_path)[: -len(STATE_SUFFIX)]
        counters = state.get("counters")
        found.append(
            LazyMount(
                mountpoint=mountpoint,
                snapshot_id=_snapshot_id(root, mountpoint),
                layer_digest=_str(state.get("layer_digest")),
                pid=_positive_int(state.get("pid")),
                problem=mount_problem(mountpoint),
                updated_at=_float(state.get("updated_at")),
                cache_dir=_str(state.get("cache_dir")),
                background=_str(state.get("background")),
                cache_disk_limited=state.get("cache_disk_limited") is True,
                counters={k: v for k, v in counters.items() if isinstance(v, int)}
                if isinstance(counters, dict)
                else {},
            )
        )
    return found


def cache_status(cache_dir: str, max_bytes: int) -> CacheStatus:
    """Bytes and spans in the cache. A cache that does not exist yet is empty (and is not
    created: status only reads)."""
    if not os.path.isdir(cache_dir):
        return CacheStatus(cache_dir, 0, 0, max_bytes)
    from snapshotter.fs.cache import SpanCache

    usage = SpanCache(cache_dir, max_bytes).usage()
    return CacheStatus(cache_dir, usage.bytes, usage.spans, max_bytes)


def daemon_status(root: str) -> DaemonStatus:
    lock_path = os.path.join(root, "lock")
    try:
        text = Path(lock_path).read_text().strip()
        st = os.stat(lock_path)
    except OSError:
        return DaemonStatus(lock_path, None, False)
    pid = int(text) if text.isdigit() else None
    # Asking flock() ourselves could make a daemon starting this very moment fail with "another
    # daemon holds the lock"; the kernel's lock table answers without taking anything.
    return DaemonStatus(lock_path, pid, _flock_held(st))


def collect_status(config: Config) -> RootStatus:
    """Everything `lazysnap status` shows for config.root; StatusError if it is not there."""
    root = os.path.abspath(config.root)
    if not os.path.isdir(root):
        raise StatusError(f"lazysnap root {root} does not exist (or is not a directory)")
    snapshots = _remote_snapshots(root)
    mounts = {m.mountpoint: m for m in lazy_mounts(root)}
    layers = []
    for snapshot_id, (name, digest) in sorted(snapshots.items()):
        mountpoint = os.path.join(root, "snapshots", str(snapshot_id), "fs")
        mount = mounts.pop(mountpoint, None)
        layers.append(_layer_status(config, mountpoint, snapshot_id, name, digest, mount))
    for mountpoint, mount in sorted(mounts.items()):  # state files no lazy snapshot owns
        layers.append(
            _layer_status(config, mountpoint, mount.snapshot_id, "", mount.layer_digest, mount)
        )
    from snapshotter.lazylayers.refusals import RefusalLedger

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
    layer_size, spans_total = _index_facts(mountpoint)
    cache_dir = (mount.cache_dir if mount else "") or config.cache_dir
    local_since = _local_since(mountpoint)
    pid = mount.pid if mount else None
    check, check_detail = _completion_check(mountpoint)
    if local_since is not None:
        state, problem = LOCAL, ""
        # The detached mount's process still runs for containers started before, or is gone.
        pid = pid if mount is not None and _process_alive(pid) else None
    elif mount is None:
        state, problem = UNMOUNTED, "no mount process (no state file)"
    else:
        state, problem = mount.state, mount.problem or ""
    from snapshotter.lazylayers.deaths import mount_table, read_record  # standard library only

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
        layer_size=layer_size,
        bytes_fetched=counters.get("bytes_fetched", 0),
        spans_total=spans_total,
        spans_cached=_spans_cached(cache_dir, digest),
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
        materialize_failed=_materialize_failed(mountpoint) if local_since is None else "",
        cache_disk_limited=mount.cache_disk_limited if mount else False,
        completion_check=check,
        check_detail=check_detail,
    )


def _materialize_failed(mountpoint: str) -> str:
    """Why copying the layer to plain files gave up, from its record; "" if it did not."""
    try:
        data = json.loads(Path(mountpoint + MATERIALIZE_FAILED_SUFFIX).read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):
        return "gave up (its record is unreadable)"
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) and reason else "gave up"


def _completion_check(mountpoint: str) -> tuple[str, str]:
    from snapshotter.sidecars import read_verdict

    verdict = read_verdict(mountpoint)
    if verdict is None:
        return "", ""
    if verdict.failed:
        return REFUSED, verdict.detail
    return (VERIFIED if verdict.diff_id else TOC_ONLY), verdict.detail


def _local_since(mountpoint: str) -> float | None:
    """When the layer at mountpoint went local, from its marker; None if it is lazy. A marker
    is written atomically, so one that reads badly still means local (time 0)."""
    try:
        text = Path(mountpoint + LOCAL_SUFFIX).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0.0
    try:
        data = json.loads(text)
    except ValueError:
        return 0.0
    when = data.get("materialized_at") if isinstance(data, dict) else None
    return _float(when) or 0.0


def _process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return bool(state) and state[0] != "Z"


def _remote_snapshots(root: str) -> dict[int, tuple[str, str]]:
    """id -> (name, layer digest) of every lazy snapshot in ROOT/metadata.db, read-only."""
    # Here, not at the top: other subcommands' start-up need not pay for sqlite.
    from snapshotter.core.metadata import MetadataError, read_snapshots

    try:
        records = read_snapshots(os.path.join(root, "metadata.db"))
    except MetadataError as err:
        raise StatusError(str(err)) from None
    return {r.id: (r.key, layer_digest_of(r.labels)) for r in records if is_remote(r.labels)}


def _index_facts(mountpoint: str) -> tuple[int | None, int | None]:
    """(compressed layer size, span count) from the index the mount process was started with."""
    spec = _read_json(Path(mountpoint + SPEC_SUFFIX))
    index_path = spec.get("index_path") if spec else None
    if not isinstance(index_path, str):
        return None, None
    from snapshotter.index.codec import decode_index
    from snapshotter.index.errors import IndexFormatError

    try:
        index = decode_index(Path(index_path).read_bytes())
    except (OSError, IndexFormatError):
        return None, None
    return index.compressed_size, len(index.spans)


def _spans_cached(cache_dir: str, layer_digest: str) -> int:
    algorithm, _, hex_digest = layer_digest.partition(":")
    if not hex_digest or "/" in layer_digest:
        return 0
    try:  # the layout of snapshotter.fs.cache: spans/<algorithm>/<hex>/<span number>
        with os.scandir(os.path.join(cache_dir, "spans", algorithm, hex_digest)) as entries:
            return sum(1 for e in entries if e.name.isdigit())
    except OSError:
        return 0


def _flock_held(st: os.stat_result) -> bool:
    """True if /proc/locks lists a flock on the file (device major:minor:inode)."""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; "->" marks a waiter, not a holder
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return True
    return False


def _snapshot_id(root: str, mountpoint: str) -> int | None:
    parent = Path(mountpoint).parent
    if parent.parent == Path(root, "snapshots") and parent.name.isdigit():
        return int(parent.name)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- the table -------------------------------------------------------------------------------


def render(status: RootStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    daemon = status.daemon
    if daemon.running:
        daemon_line = f"running, pid {daemon.pid}" if daemon.pid else "running"
    elif daemon.pid:
        daemon_line = f"not running (last pid {daemon.pid})"
    else:
        daemon_line = "not running"
    cache = status.cache
    cache_share = f" ({100 * cache.bytes / cache.max_bytes:.0f}%)" if cache.max_bytes else ""
    lines = [
        f"root    {status.root}",
        f"daemon  {daemon_line}",
        f"cache   {_size(cache.bytes)} of {_size(cache.max_bytes)}{cache_share}, "
        f"{cache.spans} spans, in {cache.dir}",
        "",
    ]
    if not status.layers:
        lines.append("no lazily mounted layers")
        lines.extend(_not_lazy_lines(status, now))
        return "\n".join(lines + _refused_lines(status)) + "\n"
    local = sum(1 for layer in status.layers if layer.state == LOCAL)
    lines.insert(-1, f"layers  {local} of {len(status.layers)} local (plain files), rest on FUSE")
    header = (
        "LAYER",
        "SNAPSHOT",
        "STATE",
        "PID",
        "FETCHED",
        "SPANS",
        "HITS",
        "ERRORS",
        "BACKGROUND",
        "CHECK",
        "UPDATED",
    )
    rows = [header]
    for layer in status.layers:
        rows.append(
            (
                _short(layer.layer_digest),
                "-" if layer.snapshot_id is None else str(layer.snapshot_id),
                layer.state,
                "-" if layer.pid is None else str(layer.pid),
                _fetched(layer),
                f"{layer.spans_cached}/{'?' if layer.spans_total is None else layer.spans_total}",
                str(layer.cache_hits),
                str(layer.read_errors) + ("" if layer.eio is None else f" ({layer.eio} EIO)"),
                layer.background or "-",
                layer.completion_check or "-",
                "-" if layer.updated_at is None else f"{max(0.0, now - layer.updated_at):.0f}s ago",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    lines.append("")
    for layer in status.layers:
        where = f"{_short(layer.layer_digest)}  {layer.mountpoint}"
        if layer.state == LOCAL:
            note = "plain files; FUSE detached"
            if layer.pid is not None:
                note += f", its process {layer.pid} still serves containers started before"
            lines.append(f"{where}  ({note})")
            continue
        notes = [layer.problem] if layer.problem else []
        if layer.degraded_spans:
            notes.append(
                f"degraded: {layer.degraded_spans} span(s) never verified, reads of them fail "
                "with EIO; rebuild the layer's index (lazysnap index build)"
            )
        if layer.materialize_failed:
            notes.append(f"materialize failed: {layer.materialize_failed}")
        if layer.cache_disk_limited:
            notes.append(
                "span cache at its disk reserve: spans served without caching; free space "
                "on the cache's filesystem or adjust [cache] min_free_bytes / min_free_percent"
            )
        lines.append(where + "".join(f"  ({note})" for note in notes))
        if layer.completion_check == REFUSED:
            lines.append(f"  FAILED its completion check, reads get EIO: {layer.check_detail}")
    lines.extend(_death_lines(status.layers, now))
    lines.extend(_not_lazy_lines(status, now))
    return "\n".join(lines + _refused_lines(status)) + "\n"


def _refused_lines(status: RootStatus) -> list[str]:
    if not status.refused_indexes:
        return []
    lines = ["", f"{len(status.refused_indexes)} index blob(s) refused on this node:"]
    for entry in status.refused_indexes:
        lines.append(
            f"  {entry['index_digest']}  layer {_short(str(entry['layer_digest']))}  "
            f"image {entry['image'] or '?'}: {entry['why']}"
        )
    return lines


def _not_lazy_lines(status: RootStatus, now: float) -> list[str]:
    if not status.not_lazy:
        return []
    lines = ["", "not lazy (pulled whole), newest first:"]
    for entry in status.not_lazy[:SHOWN_FALLBACKS]:
        age = f"{max(0.0, now - entry.at):.0f}s ago"
        lines.append(f"{_short(entry.layer_digest or entry.target)}  {age}  {entry.summary}")
    hidden = len(status.not_lazy) - SHOWN_FALLBACKS
    if hidden > 0:
        lines.append(f"... {hidden} more: lazysnap status --json")
    return lines


def _death_lines(layers: list[LayerStatus], now: float) -> list[str]:
    lines = []
    for layer in layers:
        if not layer.deaths:
            continue
        ago = "" if layer.last_death_at is None else f", last {now - layer.last_death_at:.0f}s ago"
        lines.append(
            f"{_short(layer.layer_digest)}  mount process died {layer.deaths} time(s){ago}"
        )
        if layer.stranded:
            lines.append(
                "  still on its dead FUSE connection (ENOTCONN), restart them: "
                + ", ".join(layer.stranded)
            )
    if lines:
        lines.insert(0, "")
    return lines


def _fetched(layer: LayerStatus) -> str:
    fetched = layer.bytes_fetched if layer.bytes_verified is None else layer.bytes_verified
    if layer.layer_size is None:
        return f"{_size(fetched)} of ?"
    percent = layer.fetched_percent or 0.0
    return f"{_size(fetched)} of {_size(layer.layer_size)} ({percent:.0f}%)"


def _short(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}:{hex_digest[:12]}" if hex_digest else (digest or "?")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show lazily mounted layers (fetch progress, cache, mount processes) and whether the "
        "daemon runs, read from the daemon's root on disk: works while `serve` is down."
    )
    parser.add_argument("--root", help="the daemon's state directory (overrides the config)")
    parser.add_argument(
        "--config",
        help=f"the daemon's TOML config (default: {DEFAULT_CONFIG_PATH} if it exists, "
        "else built-in defaults)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    try:
        config = load_config(path, root=args.root)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        status = collect_status(config)
    except StatusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        sys.stdout.write(render(status))
    return 0
