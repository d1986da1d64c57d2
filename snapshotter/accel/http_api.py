"""The acceleration service's HTTP routes, over whatever service answers them (server.py).

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

import hmac
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs

from snapshotter.accel.events import PayloadError
from snapshotter.accel.jobs import JobQueue, QueueClosed, QueueFull
from snapshotter.accel.metrics import CONTENT_TYPE, AccelMetrics
from snapshotter.accel.record import STATE_OF_TASK_STATUS, Job, JobState
from snapshotter.accel.store import StoreError

log = logging.getLogger("lazysnap.accel")

MAX_BODY = 4 << 20
EVENTS_PATH = "/events"
CONVERSIONS_PATH = "/api/v1/conversions"
HEALTH_PATH = "/api/v1/health"
DEFAULT_TASKS = 500  # GET /api/v1/conversions lists the newest this many (?limit=N)
MAX_TASKS = 10_000
SYNC_TIMEOUT = 3600.0  # ?sync=true waits at most this long, then answers 504


@dataclass
class Accepted:
    answer: dict[str, Any]  # the /events answer
    jobs: list[Job]  # the live job of every image the delivery named (new or deduplicated)


class WebhookService(Protocol):
    """What the routes ask of the service (server.AccelService)."""

    queue: JobQueue
    metrics: AccelMetrics

    @property
    def token(self) -> str | None: ...

    def healthy(self) -> bool: ...

    def accept(self, body: bytes) -> Accepted: ...


def http_server(host: str, port: int, service: WebhookService) -> ThreadingHTTPServer:
    """The service's HTTP server on host:port (IPv6 when host has a colon), not yet serving."""
    server_class = _Server6 if ":" in host else _Server
    server = server_class((host, port), _Handler)
    server.service = service
    return server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of new connections
    # (the client retransmits after 1 s).
    request_queue_size = 128
    service: WebhookService

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
        token = self.server.service.token
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
