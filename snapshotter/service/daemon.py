"""`lazysnap serve`: the snapshots gRPC service on a unix socket, for one ROOT.

Start order: take an fcntl lock on ROOT/lock (a second daemon on the same root exits 2), only
then replace a stale socket file, open the core, re-check remote mounts, listen (socket mode
0660), tell systemd READY=1. SIGTERM/SIGINT stop accepting, let in-flight RPCs finish within a
grace period, stop what the lazy layers run beside their mounts (the mount-process zygote; the
mount processes serve on, for the next daemon to adopt), and exit 0. Nothing heavy is imported
on this path (no FUSE, no HTTP) unless remote layers are enabled and provided by snapshotter.fs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from snapshotter.config import Config
from snapshotter.core.errors import SnapshotError
from snapshotter.core.layers import RemoteLayers
from snapshotter.root_lock import RootLock, RootLockError

if TYPE_CHECKING:
    from snapshotter.core.snapshotter import Snapshotter
    from snapshotter.metrics import DaemonMetrics
    from snapshotter.remote.session_credentials import SessionCredentials
    from snapshotter.service.cri_proxy import CriProxy
    from snapshotter.service.pull_server import PullServer

log = logging.getLogger("lazysnap.daemon")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_LOCKED = 2
EXIT_CONFIG = 2
GRACE_SECONDS = 10.0  # in-flight RPCs get this long after SIGTERM
RPC_WORKERS = 16  # containerd unpacks layers of several images at once


class DaemonError(Exception):
    """Startup failed; the message names the file or socket concerned."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def private_directory_check(path: str, key: str, *, tighten: bool) -> None:
    """Refuse a directory another user could write to (they could plant spans or state that
    our processes trust, or swap files under them): it must belong to us and not be group- or
    other-writable. tighten: also take away read access of others (the root is ours alone;
    a configured cache dir may be shared, its subdirectories are made 0700 by the cache)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise DaemonError(f"{key} {path}: {err.strerror}") from None
    problems = []
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o022:
        problems.append(f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})")
    if problems:
        raise DaemonError(
            f"{key} {path} is {' and '.join(problems)}: other users could change what lazysnap "
            f"serves; fix it with `chown {os.geteuid()} {path} && chmod go-w {path}`, or "
            "configure a directory of its own"
        )
    if tighten and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def sd_notify(state: str) -> bool:
    """Send state (e.g. "READY=1") to $NOTIFY_SOCKET, as sd_notify(3); False if not set."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("sd_notify %s to %s failed: %s", state, address, err)
        return False
    return True


def _remove_stale_socket(address: str) -> None:
    try:
        st = os.lstat(address)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{address} exists and is not a socket; refusing to replace it")
    os.unlink(address)  # we hold the root lock, so no live daemon of ours owns it


def load_remote_layers(
    config: Config, session: SessionCredentials | None = None
) -> RemoteLayers | None:
    """The lazy-layer implementation, or None (plain overlay snapshots only). session: the
    CRI proxy's in-memory pull credentials, consulted before the node's docker config.

    snapshotter.source.factory assembles registry client, index discovery and the FUSE layer
    manager; it is imported only here so that a daemon with remote layers disabled never loads
    FUSE or HTTP code.
    """
    if not config.remote.enable:
        log.info("remote layers disabled by configuration: serving ordinary snapshots")
        return None
    try:
        from snapshotter.source.factory import lazy_layers_from_config
    except ImportError as err:
        log.warning("remote layers unavailable (%s): serving ordinary snapshots", err)
        return None
    try:
        return lazy_layers_from_config(config, session)
    except Exception as err:  # a bad hosts dir or docker config must not stop the daemon
        log.warning("remote layers unavailable (%s): serving ordinary snapshots", err)
        return None


@runtime_checkable
class Closable(Protocol):
    def close(self) -> None: ...


def close_remote_layers(remote: RemoteLayers | None) -> None:
    """Stop the lazy layers' helpers (LazyLayers.close: the zygote) rather than leave them to
    notice the daemon's exit; a failure is logged, the daemon still stops."""
    if not isinstance(remote, Closable):
        return
    try:
        remote.close()
    except Exception as err:
        log.warning("stopping the lazy layers' helpers: %s", err)


def _daemon_metrics(config: Config, root: str) -> DaemonMetrics | None:
    """The metrics registry when [metrics] address is set; prometheus-client is imported only
    then, so serve without metrics starts as fast as before."""
    if not config.metrics.address:
        return None
    from snapshotter.metrics import DaemonMetrics, MetricsError, is_loopback, parse_address

    address = config.metrics.address
    try:
        host, _ = parse_address(address)
    except MetricsError as err:
        raise DaemonError(str(err), EXIT_CONFIG) from None
    if not is_loopback(host):
        if not config.metrics.allow_non_loopback:
            raise DaemonError(
                f"metrics.address {address!r} is not loopback: the metrics endpoint has no "
                "authentication, so serving it to the network takes [metrics] "
                "allow_non_loopback = true",
                EXIT_CONFIG,
            )
        log.warning(
            "metrics on %s, not loopback (metrics.allow_non_loopback = true): anyone who can "
            "reach it reads them, without authentication",
            address,
        )
    return DaemonMetrics(root, config.cache_dir, config.cache.max_size_bytes)


def _serve_metrics(metrics: DaemonMetrics, address: str) -> None:
    from snapshotter.metrics import MetricsError

    try:
        metrics.serve(address)
    except MetricsError as err:
        raise DaemonError(str(err)) from None


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def run(self) -> int:
        config = self.config
        root = os.path.abspath(config.root)
        address = os.path.abspath(config.address)
        metrics = _daemon_metrics(config, root)  # a bad metrics.address stops us before any I/O
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError as err:
            raise DaemonError(f"cannot create root {root}: {err.strerror}") from None
        private_directory_check(root, "root", tighten=True)
        cache_dir = os.path.abspath(config.cache_dir)
        if os.path.isdir(cache_dir):  # else the span cache creates it 0700
            private_directory_check(cache_dir, "[cache] dir", tighten=False)
        try:
            lock = RootLock.acquire(root)
        except RootLockError as err:
            raise DaemonError(str(err), EXIT_LOCKED if err.held else EXIT_ERROR) from None
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            try:
                os.makedirs(os.path.dirname(address), mode=0o711, exist_ok=True)
            except OSError as err:
                raise DaemonError(f"cannot create socket directory: {err}") from None
            _remove_stale_socket(address)
            session = _session_credentials(config)
            remote = load_remote_layers(config, session)
            try:
                self._serve(root, address, remote, metrics, session)
            finally:
                close_remote_layers(remote)
        finally:
            lock.release()
        return EXIT_OK

    def _serve(
        self,
        root: str,
        address: str,
        remote: RemoteLayers | None,
        metrics: DaemonMetrics | None,
        session: SessionCredentials | None,
    ) -> None:
        """Open the core over root and serve it on address until told to stop."""
        # Heavy imports only now: `lazysnap --help` and config errors stay instant.
        import grpc

        from snapshotter.core.snapshotter import Snapshotter
        from snapshotter.service.grpc_service import add_to_server

        try:
            if metrics is None:
                core = Snapshotter(root, remote=remote)
            else:  # the same core, with each Prepare's outcome counted
                core = metrics.snapshotter(root, remote)
        except (SnapshotError, OSError) as err:
            raise DaemonError(f"cannot open snapshot store in {root}: {err}") from None
        try:
            if metrics is not None:
                _serve_metrics(metrics, self.config.metrics.address)
            core.restore_remote_snapshots()
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=RPC_WORKERS))
            add_to_server(core, server)
            old_umask = os.umask(0o117)  # the socket is born 0660, never briefly wider
            try:
                bound = server.add_insecure_port(f"unix://{address}")
            except RuntimeError as err:
                raise DaemonError(f"cannot listen on {address}: {err}") from None
            finally:
                os.umask(old_umask)
            if not bound:
                raise DaemonError(f"cannot listen on {address}")
            server.start()
            os.chmod(address, 0o660)
            try:
                cri = _start_cri_proxy(self.config, session)
            except DaemonError:
                server.stop(0).wait()
                raise
            log.info("serving snapshots of %s on %s", root, address)
            pulls = _start_pull_server(address, core, self.config)
            sd_notify("READY=1")
            while not self._stop.wait(timeout=1.0):
                pass
            sd_notify("STOPPING=1")
            if pulls is not None:
                pulls.stop()
            if cri is not None:
                cri.stop(GRACE_SECONDS)
            server.stop(GRACE_SECONDS).wait()
            log.info("stopped")
        finally:
            if metrics is not None:
                metrics.stop()
            core.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)


def _start_pull_server(address: str, core: Snapshotter, config: Config) -> PullServer | None:
    """The pull socket beside address (snapshotter/pull/wire.py); the daemon serves
    snapshots without it if it cannot listen there."""
    from snapshotter.pull.wire import pull_socket_for
    from snapshotter.service.pull_server import PullServer

    def why_not_lazy(key: str) -> str | None:
        found = core.fallbacks.find(key)
        return found.summary if found is not None else None

    pulls = PullServer(pull_socket_for(address), why_not_lazy, config.remote)
    try:
        pulls.start()
    except OSError as err:
        log.warning(
            "no pull socket at %s (%s): `lazysnap pull` will pull in its own process",
            pulls.path,
            err.strerror or err,
        )
        return None
    return pulls


def _session_credentials(config: Config) -> SessionCredentials | None:
    """The in-memory store of the CRI proxy's pull credentials, when the proxy is on."""
    if not config.cri.image_service_socket:
        return None
    from snapshotter.remote.session_credentials import SessionCredentials

    return SessionCredentials(config.cri.credential_ttl_seconds)


def _start_cri_proxy(config: Config, session: SessionCredentials | None) -> CriProxy | None:
    """The CRI image-service proxy ([cri] image_service_socket), or None when off. A socket it
    cannot listen on stops the daemon: kubelet pointed at it would fail every pull."""
    if session is None:
        return None
    from snapshotter.service.cri_proxy import CriProxy

    proxy = CriProxy(
        os.path.abspath(config.cri.image_service_socket),
        config.cri.containerd_cri_socket,
        session,
    )
    try:
        proxy.start()
    except OSError as err:
        raise DaemonError(f"cri.image_service_socket: {err}") from None
    return proxy


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    try:
        return Daemon(config).run()
    except DaemonError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
