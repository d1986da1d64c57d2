"""An HTTP proxy in front of the real test registry that records each request and can hold
some back, so a test can see which requests a client had in flight at the same time.

On loopback the registry answers in a millisecond or two, so two requests sent "at once" rarely
overlap by chance. A gate holds the requests it matches until `together` of them are in flight
(then all go on): a client that sends them concurrently fills the gate at once, one that sends
them one after another reaches the gate alone each time, waits out `patience` and is recorded
with a peak of 1. Tests assert the recorded peak, never a duration.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hop-by-hop headers, and the length, which the proxy sets itself (it sends whole bodies).
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Gate:
    """Holds matching requests until `together` are in flight at once, or patience runs out."""

    matches: Callable[[str, str], bool]  # (method, path)
    together: int
    patience: float = 5.0
    in_flight: int = 0
    peak: int = 0  # the most matching requests seen in flight at the same time
    opened: bool = False  # once full, the gate stays open


@dataclass
class Hold:
    """Holds requests matching `matches` until a request matching `after` has finished (or
    patience runs out): makes answers arrive in an order the client did not ask them in."""

    matches: Callable[[str, str], bool]
    after: Callable[[str, str], bool]
    patience: float = 5.0


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int
    started: float
    finished: float  # when the registry's answer was in, about to go to the client


@dataclass
class GatedProxy:
    upstream: str  # host:port of the registry
    gates: list[Gate] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _closing: bool = False

    @property
    def host(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def gate(self, matches: Callable[[str, str], bool], together: int) -> Gate:
        gate = Gate(matches, together)
        self.gates.append(gate)
        return gate

    def hold(self, matches: Callable[[str, str], bool], after: Callable[[str, str], bool]) -> None:
        self.holds.append(Hold(matches, after))

    def finished_paths(self) -> list[str]:
        """Paths of the requests answered so far, in the order they finished."""
        with self._changed:
            return [s.path for s in sorted(self.seen, key=lambda s: s.finished)]

    def blob_gets(self) -> list[str]:
        """Paths of the blob GETs answered so far."""
        with self._changed:
            return [s.path for s in self.seen if s.method == "GET" and "/blobs/" in s.path]

    def start(self) -> GatedProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the registry offers
            # Headers and body go out as two writes: with Nagle on, the body would wait for
            # the client's delayed ACK (~40 ms) and every answer would look slow.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                proxy._serve(self)

            def do_HEAD(self) -> None:
                proxy._serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the registry's own access log has these

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._closing = True  # releases anything still held
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        started = time.monotonic()
        gates = [g for g in self.gates if g.matches(method, path)]
        self._wait_for_gates(gates)
        self._wait_for_holds(method, path)
        try:
            status, headers, body, length = self._forward(handler)
        finally:
            with self._changed:
                for gate in gates:
                    gate.in_flight -= 1
        # Recorded before it is sent: a client that has its answer finds it in `seen`.
        with self._changed:
            self.seen.append(Seen(method, path, status, started, time.monotonic()))
            self._changed.notify_all()
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)

    def _wait_for_gates(self, gates: list[Gate]) -> None:
        with self._changed:
            for gate in gates:
                gate.in_flight += 1
                gate.peak = max(gate.peak, gate.in_flight)
                if gate.in_flight >= gate.together:
                    gate.opened = True
            self._changed.notify_all()
            for gate in gates:

                def full(gate: Gate = gate) -> bool:
                    return gate.opened or self._closing

                self._changed.wait_for(full, gate.patience)

    def _wait_for_holds(self, method: str, path: str) -> None:
        with self._changed:
            for hold in self.holds:
                if not hold.matches(method, path):
                    continue

                def released(hold: Hold = hold) -> bool:
                    return self._closing or any(hold.after(s.method, s.path) for s in self.seen)

                self._changed.wait_for(released, hold.patience)

    def _forward(
        self, handler: BaseHTTPRequestHandler
    ) -> tuple[int, list[tuple[str, str]], bytes, int]:
        """(status, headers, body, content length) of the registry's answer."""
        host, port = self.upstream.rsplit(":", 1)
        upstream = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _NOT_FORWARDED}
            upstream.request(handler.command, handler.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _NOT_FORWARDED]
            length = len(body)
            if handler.command == "HEAD":  # no body, but the length it would have
                length = int(response.getheader("Content-Length") or 0)
            return response.status, kept, body, length
        finally:
            upstream.close()
