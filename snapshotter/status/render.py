"""`lazysnap status`'s table: a RootStatus as text, ages counted from now."""

from __future__ import annotations

import time

from snapshotter.status.model import LOCAL, REFUSED, LayerStatus, RootStatus

SHOWN_FALLBACKS = 20  # the table lists this many layers that were not lazy, newest first


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
        if layer.pack:
            notes.append(
                f"start-up pack {layer.pack}: {_size(layer.pack_bytes)} fetched, "
                f"{layer.pack_reads} reads served from it"
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
