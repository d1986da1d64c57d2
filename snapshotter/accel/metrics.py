"""Prometheus metrics of `lazysnap accel serve` (GET /metrics on the service's listener).

Job counts by status and the age of the oldest queued job are read from the store at
scrape time, so every replica of one store reports the same numbers for them (use max(),
not sum(), across replicas); build figures and webhook counts are this process's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from snapshotter.accel.record import TASK_STATUS
from snapshotter.accel.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        counts = self._store.counts()
        jobs = GaugeMetricFamily(
            "lazysnap_accel_jobs",
            "Jobs in the store by status (queued, running, succeeded, failed; finished ones "
            "within the kept history)",
            labels=["status"],
        )
        for state, status in TASK_STATUS.items():
            jobs.add_metric([status], counts.by_state[state])
        yield jobs
        age = 0.0 if counts.oldest_queued is None else self._clock() - counts.oldest_queued
        yield GaugeMetricFamily(
            "lazysnap_accel_queue_age_seconds",
            "Seconds the oldest queued job has waited (0: nothing queued)",
            value=max(0.0, age),
        )


class AccelMetrics:
    def __init__(self, store: JobStore, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store, clock))
        self.webhook_images = Counter(
            "lazysnap_accel_webhook_images",
            "Images named by accepted webhooks, by what became of them",
            ["result"],  # queued | deduplicated | skipped
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "lazysnap_accel_jobs_finished",
            "Jobs this replica finished, by outcome (failed: gave up)",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "lazysnap_accel_job_retries",
            "Attempts that failed for a transient reason and were queued again",
            registry=self.registry,
        )
        self.build_seconds = Histogram(
            "lazysnap_accel_build_seconds",
            "Seconds one image's index build took (every platform)",
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self.bytes_read = Counter(
            "lazysnap_accel_bytes_read",
            "Compressed layer bytes read from registries to build indexes",
            registry=self.registry,
        )
        self.layers = Counter(
            "lazysnap_accel_layers",
            "Layers handled by index builds: built (read and indexed) or reused (from the "
            "layer index cache)",
            ["how"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
