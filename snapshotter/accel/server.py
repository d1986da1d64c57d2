"""The acceleration service: an HTTP endpoint for registry webhooks, a durable job queue,
workers.

Routes:
  POST /events   a webhook delivery (docker distribution envelope or Harbor payload);
                 answers 202 {"queued": [...], "deduplicated": n, "skipped": n} once the
                 jobs are in the store, the indexing happens on the workers. 400 only for a
                 body that is neither format, 401 for a missing or wrong bearer token, 413
                 for a body over 4 MiB.
  POST /api/v1/conversions[?sync=true]
                 acceld's route, same payloads (Harbor's PUSH_ARTIFACT and CloudEvents
                 formats, distribution envelopes): 200 {"tasks": [...]} once queued; with
                 sync=true once every task of the delivery finished (500 if one failed).
  GET  /api/v1/conversions[?status=S[,S...]][&limit=N]
                 the task list, newest first, 500 unless limit says (acceld's shape plus
                 ours): id, image, status (queued, running, succeeded, failed), reason,
                 created, finished, ...
  GET  /api/v1/health   200 "Ok" while the workers live and the store answers, else 500
  GET  /status   queued / running / done / failed jobs and counters (token required too:
                 it names repositories)
  GET  /healthz  200 {"status": "ok"} while every worker thread is alive, else 503
  GET  /metrics  Prometheus metrics (metrics.py); no token (names no repository)

Webhook routes answer 503 while shutting down, with 10000 images waiting or when the store
cannot be written: the registry re-sends the delivery later, and what was already queued
from it is deduplicated.

With a token, callers must send `Authorization: Bearer <token>`: distribution sends it from
its endpoint's `headers`, Harbor from the webhook policy's auth header.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from snapshotter.accel.events import PayloadError, PushedImage, parse_delivery
from snapshotter.accel.jobs import JobQueue, QueueClosed, QueueFull
from snapshotter.accel.logs import job_log
from snapshotter.accel.metrics import CONTENT_TYPE, AccelMetrics
from snapshotter.accel.reconcile import Reconciler
from snapshotter.accel.record import STATE_OF_TASK_STATUS, Job, JobState, Outcome
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

MAX_BODY = 4 << 20
EVENTS_PATH = "/events"
CONVERSIONS_PATH = "/api/v1/conversions"
HEALTH_PATH = "/api/v1/health"
DEFAULT_TASKS = 500  # GET /api/v1/conversions lists the newest this many (?limit=N)
MAX_TASKS = 10_000
SYNC_TIMEOUT = 3600.0  # ?sync=true waits at most this long, then answers 504


@dataclass
class ServiceConfig:
    host: str
    port: int
    workers: int = 1
    token: str | None = None
    allowed_registries: frozenset[str] = frozenset()  # empty: any registry
    worker_options: WorkerOptions = field(default_factory=WorkerOptions)


@dataclass
class Accepted:
    answer: dict[str, Any]  # the /events answer
    jobs: list[Job]  # the live job of every image the delivery named (new or deduplicated)


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
        server_class = _Server6 if ":" in config.host else _Server
        self._http = server_class((config.host, config.port), _Handler)
        self._http.service = self
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of new connections
    # (the client retransmits after 1 s).
    request_queue_size = 128
    service: AccelService

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Registries drop idle keep-alive connections; socketserver would print a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: with Nagle's algorithm the body waits
    # for the client's delayed ACK of the headers, 40 ms per answer on keep-alive.
    disable_nagle_algorithm = True

    # -- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        service = self.server.service
        if path == "/healthz":
            if service.healthy():
                self._reply(HTTPStatus.OK, {"status": "ok"})
            else:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "worker thread died"})
        elif path == HEALTH_PATH:
            self._health()
        elif path == "/metrics":
            self._send(HTTPStatus.OK, service.metrics.exposition(), CONTENT_TYPE)
        elif path == "/status":
            if self._authorized():
                self._reply(HTTPStatus.OK, service.queue.status())
        elif path == CONVERSIONS_PATH:
            if self._authorized():
                self._list_tasks(query)
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"})

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        if path not in (EVENTS_PATH, CONVERSIONS_PATH):
            self._discard_body()
            self._reply(
                HTTPStatus.NOT_FOUND,
                {"error": f"no such path {path}; POST {EVENTS_PATH} or {CONVERSIONS_PATH}"},
            )
            return
        if not self._authorized():
            return
        body = self._read_body()
        if body is None:
            return
        try:
            accepted = self.server.service.accept(body)
        except PayloadError as exc:
            log.warning("webhook from %s refused: %s", self.client_address[0], exc)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except (QueueClosed, QueueFull, StoreError) as exc:
            # 503: distribution re-sends the delivery after its backoff.
            log.warning("webhook from %s deferred: %s", self.client_address[0], exc)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        if path == EVENTS_PATH:
            self._reply(HTTPStatus.ACCEPTED, accepted.answer)
        elif _flag(parse_qs(query).get("sync", [])):
            self._sync(accepted)
        else:
            tasks = [job.to_task() for job in accepted.jobs]
            self._reply(HTTPStatus.OK, {**accepted.answer, "tasks": tasks})

    # -- acceld-compatible routes -------------------------------------------------------------

    def _sync(self, accepted: Accepted) -> None:
        """Answer once every task of the delivery finished: 200, or 500 naming the failure."""
        queue = self.server.service.queue
        try:
            jobs = queue.wait_finished([job.id for job in accepted.jobs], SYNC_TIMEOUT)
        except StoreError as exc:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        if jobs is None:
            self._reply(
                HTTPStatus.GATEWAY_TIMEOUT,
                {"error": f"tasks not finished within {SYNC_TIMEOUT:.0f} s; they go on"},
            )
            return
        tasks = [job.to_task() for job in jobs]
        failed = [job for job in jobs if job.state is JobState.FAILED]
        if failed:
            reasons = "; ".join(f"{job.image}: {job.detail}" for job in failed)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": reasons, "tasks": tasks})
        else:
            self._reply(HTTPStatus.OK, {**accepted.answer, "tasks": tasks})

    def _list_tasks(self, query: str) -> None:
        params = parse_qs(query)
        wanted = params.get("status", [])
        limit_text = params.get("limit", [str(DEFAULT_TASKS)])[-1]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_TASKS:
            self._reply(
                HTTPStatus.BAD_REQUEST,
                {"error": f"limit must be a number within 1..{MAX_TASKS}, got {limit_text!r}"},
            )
            return
        states: list[JobState] = []
        for status in ",".join(wanted).split(","):
            if not status:
                continue
            state = STATE_OF_TASK_STATUS.get(status)
            if state is None:
                choices = ", ".join(STATE_OF_TASK_STATUS)
                self._reply(
                    HTTPStatus.BAD_REQUEST,
                    {"error": f"unknown status {status!r}: one of {choices}"},
                )
                return
            states.append(state)
        try:
            jobs = self.server.service.queue.tasks(states, int(limit_text))
        except StoreError as exc:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        self._send(HTTPStatus.OK, _json([job.to_task() for job in jobs]), "application/json")

    def _health(self) -> None:
        service = self.server.service
        problem = None if service.healthy() else "a worker thread died"
        if problem is None:
            try:
                service.queue.store.counts()
            except StoreError as exc:
                problem = str(exc)
        if problem is None:
            self._send(HTTPStatus.OK, b"Ok", "text/plain; charset=utf-8")
        else:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, problem.encode(), "text/plain")

    # -- helpers ------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.server.service.config.token
        if token is None:
            return True
        sent = self.headers.get("Authorization", "")
        scheme, _, value = sent.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            return True
        self._discard_body()
        log.warning(
            "refused %s %s from %s: %s bearer token",
            self.command,
            self.path,
            self.client_address[0],
            "wrong" if sent else "no",
        )
        self._reply(
            HTTPStatus.UNAUTHORIZED,
            {"error": "missing or wrong bearer token"},
            extra=[("WWW-Authenticate", 'Bearer realm="lazysnap-accel"')],
        )
        return False

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():
            return None
        return int(raw)

    def _read_body(self) -> bytes | None:
        length = self._content_length()
        if length is None:
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        if length > MAX_BODY:
            self.close_connection = True
            self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body of {length} bytes exceeds the {MAX_BODY} byte limit"},
            )
            return None
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        """Read (or give up on) a request body we will not use, keeping keep-alive sane."""
        length = self._content_length()
        if length is None or length > MAX_BODY:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _reply(
        self,
        status: HTTPStatus,
        doc: dict[str, Any],
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._send(status, _json(doc), "application/json", extra)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=1).encode() + b"\n"


def _flag(values: list[str]) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")
