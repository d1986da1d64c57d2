"""The acceleration service: a durable job queue, its workers, the lease heartbeat, the
reconcile pass, and the HTTP endpoint (http_api.py: the routes) registries deliver webhooks to.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snapshotter.accel.events import PushedImage, parse_delivery
from snapshotter.accel.http_api import Accepted, http_server
from snapshotter.accel.jobs import JobQueue
from snapshotter.accel.logs import job_log
from snapshotter.accel.metrics import AccelMetrics
from snapshotter.accel.reconcile import Reconciler
from snapshotter.accel.record import Job, Outcome
from snapshotter.accel.store import StoreError
from snapshotter.accel.worker import (
    JobFailed,
    JobResult,
    RegistryClients,
    WorkerOptions,
    index_pushed_image,
)
from snapshotter.remote.errors import RegistryError
from snapshotter.remote.reference import Reference

log = logging.getLogger("lazysnap.accel")


@dataclass
class ServiceConfig:
    host: str
    port: int
    workers: int = 1
    token: str | None = None
    allowed_registries: frozenset[str] = frozenset()  # empty: any registry
    worker_options: WorkerOptions = field(default_factory=WorkerOptions)


Indexer = Callable[[RegistryClients, Any, WorkerOptions], JobResult]


class AccelService:
    """Owns the queue, the worker threads, the lease heartbeat and the HTTP server.
    start(); stop()."""

    def __init__(
        self,
        config: ServiceConfig,
        clients: RegistryClients,
        queue: JobQueue,
        metrics: AccelMetrics,
        indexer: Indexer = index_pushed_image,
    ) -> None:
        self.config = config
        self.clients = clients
        self.queue = queue
        self.metrics = metrics
        self._indexer = indexer
        self._workers: list[threading.Thread] = []
        self.stopping = threading.Event()  # set when stop() begins: background loops end
        self._drained = threading.Event()  # set when no job runs any more: leases end
        self._heartbeat: threading.Thread | None = None
        self.reconciler: Reconciler | None = None  # set before start() to reconcile
        self._reconcile_thread: threading.Thread | None = None
        self._http = http_server(config.host, config.port, self)
        self._http_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        for number in range(self.config.workers):
            thread = threading.Thread(target=self._work, name=f"accel-worker-{number}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self._heartbeat = threading.Thread(target=self._renew, name="accel-leases", daemon=True)
        self._heartbeat.start()
        if self.reconciler is not None:
            self._reconcile_thread = threading.Thread(
                target=self.reconciler.run, name="accel-reconcile", daemon=True
            )
            self._reconcile_thread.start()
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="accel-http", daemon=True
        )
        self._http_thread.start()

    def stop(self, grace_seconds: float = 600.0) -> None:
        """Drain: stop accepting webhooks and taking jobs, let running jobs finish (their
        leases kept), leave queued ones in the store for the next start or another replica.
        Jobs still running after grace_seconds are given back to the store."""
        self.stopping.set()
        self._http.shutdown()
        self._http.server_close()
        try:
            waiting = self.queue.close()
            log.info("draining: %d queued job(s) stay in %s", waiting, self.queue.store.description)
        except StoreError as exc:
            log.warning("draining: %s", exc)
        if not self.queue.wait_idle(grace_seconds):
            try:
                released = self.queue.release_running()
            except StoreError as exc:  # their leases expire instead
                log.warning("cannot give running jobs back: %s", exc)
            else:
                log.warning(
                    "stopping with jobs still running after %.0f s: %d given back to the store",
                    grace_seconds,
                    released,
                )
        self._drained.set()
        for thread in self._workers:
            thread.join(timeout=1.0)
        for other in (self._heartbeat, self._reconcile_thread):
            if other is not None:
                other.join(timeout=5.0)
        self.clients.close()

    @property
    def token(self) -> str | None:
        """The bearer token webhooks and the task API must send (None: no token)."""
        return self.config.token

    def healthy(self) -> bool:
        return all(thread.is_alive() for thread in self._workers)

    # -- webhook intake -----------------------------------------------------------------------

    def accept(self, body: bytes) -> Accepted:
        """Queue the images of one delivery (committed to the store on return). PayloadError
        for an unreadable body; QueueClosed, QueueFull, StoreError: try again later."""
        delivery = parse_delivery(body, self.config.worker_options.cache_repos)
        queued: list[str] = []
        jobs: list[Job] = []
        deduplicated = 0
        refused = 0
        for skip in delivery.skipped:
            if skip.malformed:
                log.warning("webhook event skipped: %s: %s", skip.what, skip.reason)
            else:
                log.debug("webhook event skipped: %s: %s", skip.what, skip.reason)
        for image in delivery.images:
            allowed = self.config.allowed_registries
            if allowed and image.registry not in allowed:
                refused += 1
                log.warning(
                    "webhook names registry %s, which is not in --allow-registry: %s ignored",
                    image.registry,
                    image,
                )
                continue
            if image.unresolved:
                resolved = self._resolve(image)
                if resolved is None:
                    refused += 1
                    continue
                image = resolved
            job, created = self.queue.submit(image)
            jobs.append(job)
            if created:
                queued.append(str(image))
                log.debug("job %d: queued %s", job.id, image)
            else:
                deduplicated += 1
                log.debug("job %d: already %s: %s", job.id, job.state, image)
        skipped = len(delivery.skipped) + refused
        malformed = sum(1 for skip in delivery.skipped if skip.malformed)
        self.queue.note_skipped(skipped, malformed)
        self.metrics.webhook_images.labels("queued").inc(len(queued))
        self.metrics.webhook_images.labels("deduplicated").inc(deduplicated)
        self.metrics.webhook_images.labels("skipped").inc(skipped)
        answer = {"queued": queued, "deduplicated": deduplicated, "skipped": skipped}
        return Accepted(answer, jobs)

    def _resolve(self, image: PushedImage) -> PushedImage | None:
        """The digest of a tag-only request, looked up now (the tag may move later)."""
        ref = Reference.parse(f"{image.registry}/{image.repository}:{image.tag}")
        try:
            manifest = self.clients.for_registry(image.registry).get_manifest(ref)
        except RegistryError as exc:
            log.warning("webhook names %s, which cannot be resolved: %s", ref, exc)
            return None
        return dataclasses.replace(image, digest=manifest.digest, media_type=manifest.media_type)

    # -- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                job = self.queue.take()
            except Exception as exc:  # the database is away: keep trying, slowly
                log.error("cannot claim a job: %s", exc, exc_info=not isinstance(exc, StoreError))
                if self.stopping.wait(5.0):
                    return
                continue
            if job is None:
                return
            try:
                self._run(job)
            except Exception as exc:  # its lease expires and the job runs again
                job_log(log, job.id).error(
                    "job %d: cannot record the result: %s",
                    job.id,
                    exc,
                    exc_info=not isinstance(exc, StoreError),
                )

    def _renew(self) -> None:
        interval = max(0.1, self.queue.lease_seconds / 3)
        while not self._drained.wait(interval):
            try:
                lost = self.queue.renew()
            except StoreError as exc:
                log.error("cannot renew job leases: %s", exc)
                continue
            for job in lost:
                job_log(log, job.id).warning(
                    "job %d: lease lost (another worker may run it too)", job.id
                )

    def _run(self, job: Job) -> None:
        image = job.image
        jlog = job_log(log, job.id)
        jlog.info("job %d: attempt %d: indexing %s", job.id, job.attempts, image)
        try:
            result = self._indexer(self.clients, image, self.config.worker_options)
        except JobFailed as exc:
            delay = self.queue.fail(job, exc.reason, transient=exc.transient)
            if delay is not None:
                self.metrics.retries.inc()
                jlog.warning(
                    "job %d: attempt %d for %s failed, retrying in %.1f s: %s",
                    job.id,
                    job.attempts,
                    image,
                    delay,
                    _one_line(exc.reason),
                )
            else:
                self.metrics.jobs_finished.labels("failed").inc()
                jlog.error("job %d: failed %s: %s", job.id, image, _one_line(job.detail))
            return
        except Exception as exc:  # a bug must fail this job, not kill the worker
            jlog.exception("job %d: failed %s: unexpected error", job.id, image)
            self.queue.fail(job, f"internal error: {type(exc).__name__}: {exc}", transient=False)
            self.metrics.jobs_finished.labels("failed").inc()
            return
        self.queue.finish(job, result.outcome, result.detail, result.artifacts)
        self.metrics.jobs_finished.labels(str(result.outcome)).inc()
        if result.layers_built or result.layers_reused:
            self.metrics.build_seconds.observe(result.build_seconds)
        self.metrics.bytes_read.inc(result.bytes_read)
        self.metrics.layers.labels("built").inc(result.layers_built)
        self.metrics.layers.labels("reused").inc(result.layers_reused)
        if result.outcome is Outcome.IGNORED:
            # Our own artifacts come back after every build: not worth a line each.
            jlog.log(
                logging.DEBUG if result.own else logging.INFO,
                "job %d: ignored %s: %s",
                job.id,
                image,
                result.detail,
            )
        else:
            jlog.info("job %d: %s %s: %s", job.id, result.outcome, image, result.detail)


def _one_line(text: str) -> str:
    return " ".join(text.split())
