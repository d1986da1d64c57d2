"""Prometheus metrics of `lazysnap serve`, on `[metrics] address` (prometheus-client).

Imported only when metrics are enabled, so a daemon without them never loads prometheus-client.
Two sources, neither of which makes the core know about metrics:
- Prepare outcomes (lazy / fallback by reason class / ordinary) are counted by PrepareOutcomes,
  the observer the core is given (snapshotter/core/outcomes.py): the core tells it each
  Prepare's outcome and, for a fallback, the FallbackReason the failure carried. A lazy mount
  may still be starting when its Prepare answers (the daemon mounts in the background): it
  counts as "lazy" once the mount is live, or as "lazy_failed" if it never became so; until
  then it is in lazy_layers_starting. The outcome comes from the manager's on_settled()
  observer (LazyLayers), which holds no lock while the mount starts; a RemoteLayers without one
  is asked with check() on a thread of its own.
- Lazy layers' figures (bytes and spans fetched, cache hits, read errors, per layer digest) and
  the cache's size are read at scrape time by LazyLayerCollector from the mount processes' state
  files and the cache directory, through the queries `lazysnap status` uses (status/collect.py):
  mount processes are separate processes that outlive serve, and their state files are the
  record they keep for everyone.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from snapshotter.core.layers import FallbackReason, RemoteLayers, RemoteLayerUnavailable
from snapshotter.core.outcomes import PreparedLayer, PrepareOutcome
from snapshotter.core.snapshotter import Snapshotter

log = logging.getLogger("lazysnap.metrics")

LAZY = "lazy"
LAZY_FAILED = "lazy_failed"
FALLBACK = "fallback"
ORDINARY = "ordinary"

# Per-layer counters in the mount processes' state files -> metric name and help.
_LAYER_COUNTERS = (
    ("bytes_fetched", "lazysnap_layer_fetched_bytes", "Compressed bytes fetched from the registry"),
    ("spans_fetched", "lazysnap_layer_fetched_spans", "Spans fetched, inflated and verified"),
    ("range_requests", "lazysnap_layer_range_requests", "Range requests sent to the registry"),
    ("cache_hits", "lazysnap_layer_cache_hits", "Span reads served from the span cache"),
    ("fetch_errors", "lazysnap_layer_read_errors", "Spans whose fetch or verification failed"),
    (
        "readahead_spans",
        "lazysnap_layer_readahead_spans",
        "Spans fetched ahead of a sequential read before it needed them",
    ),
    (
        "degraded_spans",
        "lazysnap_layer_degraded_spans",
        "Spans background fetch gave up on: their bytes never verify (reads of them get EIO)",
    ),
)


class MetricsError(Exception):
    """The metrics endpoint cannot be served; the message names the address."""


# -- Prepare outcomes -------------------------------------------------------------------------


def fallback_reason(exc: BaseException) -> str:
    """A short, stable class for why a layer was not mounted lazily (a metric label value): the
    FallbackReason the failure carries; internal_error for any other exception (a bug in the
    lazy path, which the core falls back from anyway)."""
    if isinstance(exc, RemoteLayerUnavailable):
        return exc.reason.value
    return FallbackReason.INTERNAL_ERROR.value


@runtime_checkable
class SettleObservable(Protocol):
    """A RemoteLayers that can say how a mount settles without being waited on (LazyLayers)."""

    def on_settled(
        self, mountpoint: str, callback: Callable[[RemoteLayerUnavailable | None], None]
    ) -> None: ...


class PrepareCounter:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "lazysnap_prepares",
            "Prepare calls that succeeded, by outcome: lazy (layer mounted lazily, and the mount "
            "became live), lazy_failed (answered lazily, but the mount never became live; "
            "reason says why; the layer is mounted again when used), fallback (lazy was asked "
            "for but the layer is pulled whole; reason says why) or ordinary (no lazy layer "
            "asked for)",
            ("outcome", "reason"),
            registry=registry,
        )
        self.starting = Gauge(
            "lazysnap_lazy_layers_starting",
            "Lazy mounts of answered Prepares not yet live nor failed (counted in "
            "lazysnap_prepares once they are)",
            registry=registry,
        )

    def count(self, outcome: str, reason: str = "") -> None:
        self.counter.labels(outcome=outcome, reason=reason).inc()

    def follow(self, remote: RemoteLayers, layer: PreparedLayer) -> None:
        """Count a lazily answered Prepare once its mount is live or failed; the Prepare does not
        wait. Asked through on_settled() where there is one: check() waits holding the layer's
        lock and cleans a failed mount away, which is the core's business, not the metrics'."""
        self.starting.inc()
        if isinstance(remote, SettleObservable):
            remote.on_settled(layer.mountpoint, self._settled)
            return
        threading.Thread(
            target=self._settle,
            args=(remote, layer),
            name=f"metrics-mount {layer.mountpoint}",
            daemon=True,
        ).start()

    def _settled(self, failure: RemoteLayerUnavailable | None) -> None:
        try:
            if failure is None:
                self.count(LAZY)
            else:
                self.count(LAZY_FAILED, fallback_reason(failure))
        finally:
            self.starting.dec()

    def _settle(self, remote: RemoteLayers, layer: PreparedLayer) -> None:
        try:
            remote.check(layer.mountpoint, layer.labels)
        except Exception as exc:  # any failure is this mount's outcome
            self.count(LAZY_FAILED, fallback_reason(exc))
        else:
            self.count(LAZY)
        finally:
            self.starting.dec()


@dataclass(frozen=True)
class PrepareOutcomes:
    """The core's Prepare observer: counts each outcome, following lazy mounts until they
    settle (through remote, the RemoteLayers the core mounts with)."""

    prepares: PrepareCounter
    remote: RemoteLayers | None

    def __call__(
        self, layer: PreparedLayer, outcome: PrepareOutcome, reason: FallbackReason | None
    ) -> None:
        if outcome is PrepareOutcome.LAZY:
            if self.remote is not None:
                self.prepares.follow(self.remote, layer)
        elif outcome is PrepareOutcome.FALLBACK:
            self.prepares.count(FALLBACK, (reason or FallbackReason.OTHER).value)
        else:
            self.prepares.count(ORDINARY)


# -- figures read at scrape time ---------------------------------------------------------------


class LazyLayerCollector(Collector):
    """Per-layer figures from the mount processes' state files, and the cache's size."""

    def __init__(self, root: str, cache_dir: str, cache_max_bytes: int) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes

    def collect(self) -> Iterator[Any]:
        from snapshotter.status.collect import cache_status, lazy_mounts
        from snapshotter.status.model import LIVE

        mounts = lazy_mounts(self.root)
        live = sum(1 for m in mounts if m.state == LIVE)
        yield GaugeMetricFamily(
            "lazysnap_lazy_layers_mounted", "Lazy layers mounted and served now", value=live
        )
        yield GaugeMetricFamily(
            "lazysnap_lazy_layers_broken",
            "Lazy layers with a state file whose mount or mount process is gone",
            value=len(mounts) - live,
        )
        by_background: dict[str, int] = {}
        for mount in mounts:
            if mount.state == LIVE and mount.background:
                by_background[mount.background] = by_background.get(mount.background, 0) + 1
        background = GaugeMetricFamily(
            "lazysnap_lazy_layers_background",
            "Mounted lazy layers by the state of their background fetch of the whole layer",
            labels=("state",),
        )
        for state, count in sorted(by_background.items()):
            background.add_metric((state,), count)
        yield background
        # One layer can be mounted more than once (same blob under two chains): sum per digest.
        totals: dict[str, dict[str, int]] = {}
        for mount in mounts:
            per_layer = totals.setdefault(mount.layer_digest or "unknown", {})
            for key, value in mount.counters.items():
                per_layer[key] = per_layer.get(key, 0) + value
        for key, name, help_text in _LAYER_COUNTERS:
            family = CounterMetricFamily(name, help_text + ", per layer", labels=("layer",))
            for digest, counters in sorted(totals.items()):
                family.add_metric((digest,), counters.get(key, 0))
            yield family
        from snapshotter.lazylayers.refusals import RefusalLedger

        ledger = RefusalLedger(self.root)  # kept by the daemon's manager, over restarts
        checks = CounterMetricFamily(
            "lazysnap_completion_check",
            "Completion checks of fully fetched lazy layers (diffID and TOC), by result",
            labels=("result",),
        )
        for result, count in sorted(ledger.counts().items()):
            checks.add_metric((result,), count)
        yield checks
        yield GaugeMetricFamily(
            "lazysnap_refused_indexes",
            "Index blobs refused on this node after failing the completion check",
            value=len(ledger.refusals()),
        )
        yield from self._deaths()
        cache = cache_status(self.cache_dir, self.cache_max_bytes)
        yield GaugeMetricFamily("lazysnap_cache_bytes", "Bytes in the span cache", cache.bytes)
        yield GaugeMetricFamily("lazysnap_cache_spans", "Spans in the span cache", cache.spans)
        yield GaugeMetricFamily(
            "lazysnap_cache_max_bytes", "Configured span cache limit", cache.max_bytes
        )

    def _deaths(self) -> Iterator[Any]:
        from snapshotter.core.layout import snapshots_dir
        from snapshotter.lazylayers.deaths import mount_table, records_under

        records = records_under(snapshots_dir(self.root))
        table = mount_table() if records else []
        yield CounterMetricFamily(
            "lazysnap_mount_process_deaths",
            "Mount processes that died under their mount (not unmounted), since the layers "
            "were mounted",
            value=sum(r.count for r in records.values()),
        )
        yield GaugeMetricFamily(
            "lazysnap_mounts_on_dead_connections",
            "Mounts (container rootfs) still reading through the FUSE connection of a dead "
            "mount process: ENOTCONN until restarted",
            value=sum(len(r.stranded_now(table)) for r in records.values()),
        )


# -- the endpoint ----------------------------------------------------------------------------


class DaemonMetrics:
    """The daemon's registry: Prepare outcomes, lazy layers and cache, process figures.

    Build the core with snapshotter() so its Prepares are counted, then serve() the endpoint."""

    def __init__(self, root: str, cache_dir: str, cache_max_bytes: int) -> None:
        # No *_created series next to each counter: they double the output and say little here.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(LazyLayerCollector(root, cache_dir, cache_max_bytes))
        self.prepares = PrepareCounter(self.registry)
        self.port = 0  # the bound port once serving (the configured one may be 0: any free)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def snapshotter(self, root: str, remote: RemoteLayers | None) -> Snapshotter:
        """The core over root, telling these metrics each Prepare's outcome."""
        return Snapshotter(root, remote=remote, observer=PrepareOutcomes(self.prepares, remote))

    def serve(self, address: str) -> None:
        """Serve /metrics on address ("host:port") from a background thread."""
        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise MetricsError(
                f"cannot serve metrics on {address} (metrics.address): {err.strerror or err}"
            ) from None
        self.port = int(self._server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        log.info("serving metrics on http://%s:%d/metrics", shown, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1); a wildcard (0.0.0.0,
    ::) or any other name or address reaches the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: whatever it resolves to, not known to be loopback


def parse_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); MetricsError naming the value otherwise."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsError(f"metrics.address {address!r}: expected host:port, e.g. 127.0.0.1:9199")
    return host, int(port_text)
