"""The daemon's pull socket: runs `lazysnap pull` requests in this process (protocol:
snapshotter/pull/wire.py). The daemon has grpc, the containerd protobufs and the registry client
loaded, which a fresh `lazysnap pull` process spends ~0.25 s on; each request runs on a thread
of its own, and containerd's Prepare calls come back to this same daemon meanwhile."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from typing import Any, cast

from snapshotter.config import RemoteConfig
from snapshotter.pull.request import PullRequest, RequestError, execute, failure_message
from snapshotter.pull.wire import MAX_LINE, EventWriter, summary_event

log = logging.getLogger("lazysnap.pull")


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE + 1)
        try:
            if len(line) > MAX_LINE:
                raise RequestError(f"pull request longer than {MAX_LINE} bytes")
            try:
                raw = json.loads(line)
            except ValueError:
                raise RequestError("a pull request is one line of JSON") from None
            request = PullRequest.from_json(raw)
        except RequestError as err:
            self._send({"event": "error", "message": str(err)})
            return
        log.info("pull of %s for a `lazysnap pull` client", request.image)
        server = cast(_Server, self.server)
        try:
            if server.remote is not None:
                from snapshotter.pull.daemon_settings import daemon_setting_warnings
                from snapshotter.remote.docker_config import default_docker_config_path

                own = default_docker_config_path()  # this daemon's, from its environment
                for warning in daemon_setting_warnings(request, server.remote, own):
                    log.warning("pull of %s: %s", request.image, warning)
                    self._send({"event": "warning", "message": warning})
            summary = execute(request, EventWriter(self._send), server.why_not_lazy)
        except BrokenPipeError:
            log.warning("pull of %s: the client went away; the pull stopped", request.image)
            return
        except Exception as err:
            message = failure_message(request, err)
            if message is None:
                log.exception("pull of %s failed", request.image)
                message = f"pulling {request.image}: {type(err).__name__}: {err}"
            log.warning("pull failed: %s", message)
            with contextlib.suppress(OSError):
                self._send({"event": "error", "message": message})
            return
        log.info("pull of %s done in %.2fs", request.image, summary.seconds)
        with contextlib.suppress(OSError):
            self._send(summary_event(summary))

    def _send(self, event: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(event).encode() + b"\n")
        self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a pull in progress does not hold the daemon's exit
    why_not_lazy: Callable[[str], str | None] | None = None
    remote: RemoteConfig | None = None


class PullServer:
    """Listens on path (mode 0600) until stop(). why_not_lazy: the daemon's own record of why
    a layer was not lazy, by Prepare key (the pull's output shows it)."""

    def __init__(
        self,
        path: str,
        why_not_lazy: Callable[[str], str | None] | None = None,
        remote: RemoteConfig | None = None,
    ) -> None:
        self.path = path
        self.why_not_lazy = why_not_lazy
        self.remote = remote  # the daemon's registry settings: a pull whose differ is warned
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a daemon that died; the root lock is ours
        old_umask = os.umask(0o177)  # born 0600, never briefly wider
        try:
            self._server = _Server(self.path, _Handler)
            self._server.why_not_lazy = self.why_not_lazy
            self._server.remote = self.remote
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pull-server", daemon=True
        )
        self._thread.start()
        # The first pull should not pay for these either: load them now, off the start path.
        threading.Thread(target=_warm_up, name="pull-warm-up", daemon=True).start()
        log.info("serving pulls on %s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _warm_up() -> None:
    with contextlib.suppress(Exception):  # only a head start: a real pull reports any problem
        import snapshotter.pull.containerd_api
        import snapshotter.pull.puller
        import snapshotter.remote.client  # noqa: F401
