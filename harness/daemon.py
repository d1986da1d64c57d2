"""Start, stop, restart and kill -9 the `lazysnap serve` daemon."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import HarnessError, Service, spawn, unix_socket_accepts

REPO_ROOT = Path(__file__).resolve().parents[1]


def lazysnap_command() -> list[str]:
    """The `lazysnap` console script next to this Python (the venv), else the one on PATH,
    else `python -m snapshotter.cli` from the checkout."""
    beside = Path(sys.executable).parent / "lazysnap"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("lazysnap")
    if on_path is not None:
        return [on_path]
    return [sys.executable, "-m", "snapshotter.cli"]


@dataclass(frozen=True)
class DaemonSettings:
    """What `lazysnap serve` needs to serve layers lazily from the test registries."""

    hosts_dir: Path  # containerd's hosts dir: both read the same hosts.toml files
    plain_http: Sequence[str] = ()  # registries reached over http://
    min_layer_size: int = 0  # the test images' layers are small; make every indexed one lazy
    fetch_timeout_seconds: float = 30.0
    cache_max_bytes: int = 10 << 30
    log_level: str = "info"
    # [fetch] background: None leaves the daemon's default (and the key) out.
    background_fetch: bool | None = None
    # [trust]: the keys whose signatures make an index usable (PEM files or directories), and
    # the mode (None: the daemon's default, "signed").
    trust_public_keys: Sequence[Path] = ()
    trust_mode: str | None = None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, root: Path, socket: Path, settings: DaemonSettings) -> Path:
    """Write a `lazysnap serve` config.toml (docs/configuration.md) for settings."""
    hosts = ", ".join(_toml_string(host) for host in settings.plain_http)
    lines = [
        f"root = {_toml_string(str(root))}",
        f"address = {_toml_string(str(socket))}",
        f"log_level = {_toml_string(settings.log_level)}",
        "[remote]",
        f"hosts_dir = {_toml_string(str(settings.hosts_dir))}",
        f"plain_http = [{hosts}]",
        f"min_layer_size = {settings.min_layer_size}",
        f"fetch_timeout_seconds = {settings.fetch_timeout_seconds}",
        "[cache]",
        f"max_size_bytes = {settings.cache_max_bytes}",
    ]
    if settings.background_fetch is not None:
        lines += ["[fetch]", f"background = {str(settings.background_fetch).lower()}"]
    keys = ", ".join(_toml_string(str(key)) for key in settings.trust_public_keys)
    lines += ["[trust]", f"public_keys = [{keys}]"]
    if settings.trust_mode is not None:
        lines.append(f"mode = {_toml_string(settings.trust_mode)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def serve_available() -> str | None:
    """None if `lazysnap serve` can be started here, else why not."""
    if not (REPO_ROOT / "snapshotter" / "cli.py").is_file():
        return "the lazysnap daemon (snapshotter/cli.py) does not exist yet"
    return None


@dataclass
class LazysnapDaemon:
    root: Path
    socket: Path
    log_path: Path
    config: Path | None = None
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    # The `lazysnap` command to run instead of this checkout's (e.g. an installed one): it runs
    # as installed, without the checkout on PYTHONPATH.
    program: Sequence[str] | None = None
    # Whose code `python -m snapshotter.cli` runs when program is None: this checkout, or
    # another one (a benchmark comparing two revisions).
    checkout: Path = REPO_ROOT
    service: Service | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        argv = [
            *(lazysnap_command() if self.program is None else self.program),
            "serve",
            "--root",
            str(self.root),
            "--address",
            str(self.socket),
        ]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return [*argv, *self.extra_args]

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and wait until its socket accepts connections."""
        if self.service is not None and self.service.alive():
            raise HarnessError(
                f"lazysnap on {self.socket} is already running (pid {self.service.pid})"
            )
        env = dict(os.environ if self.env is None else self.env)
        if self.program is None:
            # `python -m snapshotter.cli` needs the checkout importable when not installed.
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.checkout), env.get("PYTHONPATH")])
            )
        else:
            env.pop("PYTHONPATH", None)
        # cwd /, as systemd runs it: `python -m` (mount processes) puts the cwd on sys.path, and
        # in the checkout that would import its code instead of the installed one.
        cwd = self.checkout if self.program is None else Path("/")
        self.service = spawn("lazysnap serve", self.argv(), self.log_path, env=env, cwd=cwd)
        try:
            self.service.wait_until(
                lambda: unix_socket_accepts(self.socket), f"listening on {self.socket}", timeout
            )
        except HarnessError:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.service is not None and self.service.alive()

    @property
    def cache_dir(self) -> Path:
        """Where the span cache lives (the config's default, ROOT/cache)."""
        return self.root / "cache"

    @property
    def pid(self) -> int | None:
        return None if self.service is None else self.service.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (0 is the only clean answer)."""
        if self.service is None:
            return None
        return self.service.stop(timeout, signal.SIGTERM)

    def kill(self) -> None:
        """kill -9: what a crash looks like to containerd and to the FUSE mounts."""
        if self.service is not None:
            self.service.stop(timeout=10, signum=signal.SIGKILL)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_lazysnap(
    base: Path,
    *,
    config: Path | None = None,
    settings: DaemonSettings | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    checkout: Path = REPO_ROOT,
) -> LazysnapDaemon:
    """Start `lazysnap serve --root BASE/root --address BASE/lazysnap.sock` (log in BASE).

    settings: write BASE/config.toml from them (lazy layers from the test registries);
    config: use that file instead. Neither: built-in defaults. checkout: whose code runs."""
    base.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        if config is not None:
            raise HarnessError("start_lazysnap: give config or settings, not both")
        config = write_config(base / "config.toml", base / "root", base / "lazysnap.sock", settings)
    daemon = LazysnapDaemon(
        root=base / "root",
        socket=base / "lazysnap.sock",
        log_path=base / "lazysnap.log",
        config=config,
        extra_args=extra_args,
        env=env,
        checkout=checkout,
    )
    daemon.start(timeout)
    return daemon
