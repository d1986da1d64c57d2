"""The acceleration service: an HTTP endpoint for registry webhooks, a job queue, workers.

Routes:
  POST /events   a webhook delivery (docker distribution envelope or Harbor payload);
                 answers 202 {"queued": [...], "deduplicated": n, "skipped": n} at once,
                 the indexing happens on the workers. 400 only for a body that is neither
                 format, 401 for a missing or wrong bearer token, 413 for a body over 4 MiB.
  GET  /status   queued / running / done / failed jobs and counters (token required too:
                 it names repositories)
  GET  /healthz  200 {"status": "ok"} while every worker thread is alive, else 503

POST /events answers 503 while shutting down or with 10000 images waiting: the registry
re-sends the delivery later, and what was already queued from it is deduplicated.

With a token, callers must send `Authorization: Bearer <token>`: distribution sends it from
its endpoint's `headers`, Harbor from the webhook policy's auth header.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from snapshotter.accel.events import PayloadError, parse_delivery
from snapshotter.accel.jobs import Job, JobQueue, Outcome, QueueClosed, QueueFull
from snapshotter.accel.worker import (
    JobFailed,
    RegistryClients,
    WorkerOptions,
    index_pushed_image,
)

log = logging.getLogger("lazysnap.accel")

MAX_BODY = 4 << 20
EVENTS_PATH = "/events"


@dataclass
class ServiceConfig:
    host: str
    port: int
    workers: int = 1
    token: str | None = None
    allowed_registries: frozenset[str] = frozenset()  # empty: any registry
    worker_options: WorkerOptions = field(default_factory=WorkerOptions)


class AccelService:
    """Owns the queue, the worker threads and the HTTP server. start(); stop()."""

    def __init__(self, config: ServiceConfig, clients: RegistryClients, queue: JobQueue) -> None:
        self.config = config
        self.clients = clients
        self.queue = queue
        self._workers: list[threading.Thread] = []
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
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="accel-http", daemon=True
        )
        self._http_thread.start()

    def stop(self, grace_seconds: float = 60.0) -> None:
        """Stop accepting webhooks, drop what is queued (logged), let running jobs finish."""
        self._http.shutdown()
        self._http.server_close()
        dropped = self.queue.close()
        for job in dropped:
            log.warning("not indexed (service stopping): %s", job.image)
        if not self.queue.wait_idle(grace_seconds):
            log.warning("stopping with jobs still running after %.0f s", grace_seconds)
        for thread in self._workers:
            thread.join(timeout=1.0)
        self.clients.close()

    def healthy(self) -> bool:
        return all(thread.is_alive() for thread in self._workers)

    # -- webhook intake -----------------------------------------------------------------------

    def accept(self, body: bytes) -> dict[str, Any]:
        """Queue the images of one delivery. PayloadError for an unreadable body."""
        delivery = parse_delivery(body, self.config.worker_options.cache_repos)
        queued: list[str] = []
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
            job = self.queue.submit(image)
            if job is None:
                deduplicated += 1
                log.debug("already queued or running: %s", image)
            else:
                queued.append(str(image))
        malformed = sum(1 for skip in delivery.skipped if skip.malformed)
        self.queue.note_skipped(len(delivery.skipped) + refused, malformed)
        return {
            "queued": queued,
            "deduplicated": deduplicated,
            "skipped": len(delivery.skipped) + refused,
        }

    # -- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.queue.take()
            if job is None:
                return
            self._run(job)

    def _run(self, job: Job) -> None:
        image = job.image
        try:
            result = index_pushed_image(self.clients, image, self.config.worker_options)
        except JobFailed as exc:
            delay = self.queue.fail(job, exc.reason, transient=exc.transient)
            if delay is not None:
                log.warning(
                    "attempt %d for %s failed, retrying in %.0f s: %s",
                    job.attempts,
                    image,
                    delay,
                    _one_line(exc.reason),
                )
            else:
                log.error("failed %s: %s", image, _one_line(job.detail))
            return
        except Exception as exc:  # a bug must fail this job, not kill the worker
            log.exception("failed %s: unexpected error", image)
            self.queue.fail(job, f"internal error: {type(exc).__name__}: {exc}", transient=False)
            return
        self.queue.finish(job, result.outcome, result.detail, result.artifacts)
        if result.outcome is Outcome.IGNORED:
            # Our own artifacts come back after every build: not worth a line each.
            log.log(
                logging.DEBUG if result.own else logging.INFO,
                "ignored %s: %s",
                image,
                result.detail,
            )
        else:
            log.info("%s %s: %s", result.outcome, image, result.detail)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: AccelService

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Registries drop idle keep-alive connections; socketserver would print a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    # -- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        service = self.server.service
        if path == "/healthz":
            if service.healthy():
                self._reply(HTTPStatus.OK, {"status": "ok"})
            else:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "worker thread died"})
        elif path == "/status":
            if self._authorized():
                self._reply(HTTPStatus.OK, service.queue.status())
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != EVENTS_PATH:
            self._discard_body()
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}; POST {EVENTS_PATH}"})
            return
        if not self._authorized():
            return
        body = self._read_body()
        if body is None:
            return
        try:
            answer = self.server.service.accept(body)
        except PayloadError as exc:
            log.warning("webhook from %s refused: %s", self.client_address[0], exc)
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except (QueueClosed, QueueFull) as exc:
            # 503: distribution re-sends the delivery after its backoff.
            log.warning("webhook from %s deferred: %s", self.client_address[0], exc)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        self._reply(HTTPStatus.ACCEPTED, answer)

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
        body = json.dumps(doc, indent=1).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)
