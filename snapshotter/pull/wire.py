"""`lazysnap pull` through `lazysnap serve`: the daemon's pull socket speaks JSON lines.

Why: a pull in the CLI's own process first imports grpc, the containerd protobufs and httpx and
opens fresh connections (~0.25 s of a 0.45 s lazy pull here); the daemon has all of it loaded.

    client -> daemon   one line: the PullRequest (snapshotter.pull.request)
    daemon -> client   event lines, then one final line:
        {"event": "warning", "message"}   before the pull starts (daemon_settings.py)
        {"event": "bytes", "position", "total", "digest", "size", "done"}   (a few per second)
        {"event": "layer", "position", "total", "digest", "size", "outcome", "downloaded",
         "why_not_lazy"}   (the last: the snapshotter's reason for a layer pulled whole)
        {"event": "summary", "image", "outcomes", "bytes_downloaded", "seconds"}   final
        {"event": "error", "message"}                                             final

The socket sits beside the daemon's snapshots socket (pull_socket_for), mode 0600: whoever can
write to it makes root pull images, as root can anyway.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from snapshotter.pull.outcome import LayerOutcome, PullSummary
from snapshotter.pull.plan import LayerStep
from snapshotter.pull.progress import download_bar, layer_line, summary_line
from snapshotter.pull.request import PullRequest

MAX_LINE = 1 << 20  # a request or an event line; anything longer is not ours
BYTES_EVENT_INTERVAL_S = 0.25
CONNECT_TIMEOUT_S = 2.0


class DaemonUnavailable(Exception):
    """No daemon answers on the pull socket (not running, or too old to have one)."""


def pull_socket_for(address: str) -> str:
    """The pull socket of the daemon serving snapshots on address."""
    base, _ = os.path.splitext(address)
    return f"{base}-pull.sock"


class EventWriter:
    """The Progress a pull run by the daemon reports to: each event as one JSON line."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._total = 0

    def layer_started(self, step: LayerStep, total_layers: int) -> None:
        self._total = total_layers

    def blob_chunks(self, step: LayerStep, chunks: Iterator[bytes]) -> Iterator[bytes]:
        done = 0
        last = 0.0
        for chunk in chunks:
            done += len(chunk)
            now = time.monotonic()
            if now - last >= BYTES_EVENT_INTERVAL_S:
                last = now
                self._send({**self._layer(step), "event": "bytes", "done": done})
            yield chunk

    def layer_done(
        self, step: LayerStep, outcome: LayerOutcome, downloaded: int, why_not_lazy: str = ""
    ) -> None:
        event = {**self._layer(step), "event": "layer", "outcome": outcome.value}
        self._send({**event, "downloaded": downloaded, "why_not_lazy": why_not_lazy})

    def _layer(self, step: LayerStep) -> dict[str, Any]:
        return {
            "position": step.position,
            "total": self._total,
            "digest": step.blob.digest,
            "size": step.blob.size,
        }


def summary_event(summary: PullSummary) -> dict[str, Any]:
    return {
        "event": "summary",
        "image": summary.image,
        "outcomes": [outcome.value for outcome in summary.outcomes],
        "bytes_downloaded": summary.bytes_downloaded,
        "seconds": summary.seconds,
    }


def pull_via_daemon(
    socket_path: str,
    request: PullRequest,
    out: TextIO,
    bars: bool,
    warnings: Callable[[str], None] = lambda message: None,
) -> str | None:
    """Have the daemon at socket_path run request, printing what TerminalProgress would print
    (and passing the daemon's warnings to warnings). Returns None when the pull succeeded,
    else the daemon's error message. Raises DaemonUnavailable when no daemon answers (the
    caller then pulls in its own process)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(CONNECT_TIMEOUT_S)
        try:
            client.connect(socket_path)
        except OSError as err:
            raise DaemonUnavailable(f"{socket_path}: {err.strerror or err}") from None
        client.settimeout(None)  # a pull takes as long as it takes; the daemon owns timeouts
        client.sendall(json.dumps(request.to_json()).encode() + b"\n")
        with client.makefile("rb") as lines:
            return _render(lines, out, bars, socket_path, warnings)
    finally:
        client.close()


def _render(
    lines: Any, out: TextIO, bars: bool, socket_path: str, warnings: Callable[[str], None]
) -> str | None:
    renderer = _BarRenderer(out) if bars else None
    try:
        for raw in lines:
            if len(raw) > MAX_LINE:
                return f"the daemon at {socket_path} sent a line of {len(raw)} bytes"
            try:
                event = json.loads(raw)
            except ValueError:
                return f"the daemon at {socket_path} sent something that is not JSON"
            kind = event.get("event") if isinstance(event, dict) else None
            if kind == "bytes" and renderer is not None:
                renderer.update(event)
            elif kind == "warning":
                warnings(str(event["message"]))
            elif kind == "layer":
                if renderer is not None:
                    renderer.close()
                outcome = LayerOutcome(event["outcome"])
                print(
                    layer_line(
                        event["position"],
                        event["total"],
                        event["digest"],
                        event["size"],
                        outcome,
                        event["downloaded"],
                        str(event.get("why_not_lazy") or ""),  # absent from older daemons
                    ),
                    file=out,
                    flush=True,
                )
            elif kind == "summary":
                summary = PullSummary(
                    image=event["image"],
                    outcomes=[LayerOutcome(value) for value in event["outcomes"]],
                    bytes_downloaded=event["bytes_downloaded"],
                    seconds=event["seconds"],
                )
                print(summary_line(summary), file=out, flush=True)
                return None
            elif kind == "error":
                return str(event.get("message", "the daemon's pull failed"))
    except (KeyError, TypeError, ValueError) as err:
        return f"the daemon at {socket_path} sent an event this client cannot read: {err}"
    finally:
        if renderer is not None:
            renderer.close()
    return f"the daemon at {socket_path} ended the pull without a result (did it stop?)"


class _BarRenderer:
    """A tqdm bar for the layer being downloaded (on a terminal only)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._bar: Any = None
        self._digest = ""

    def update(self, event: dict[str, Any]) -> None:
        if self._bar is None or self._digest != event["digest"]:
            self.close()
            self._digest = event["digest"]
            self._bar = download_bar(
                self.out, event["position"], event["total"], self._digest, event["size"]
            )
        self._bar.update(event["done"] - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
