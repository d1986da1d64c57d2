"""`lazysnap pull IMAGE` (wired by snapshotter/cli.py): has the local `lazysnap serve` run the pull
through its pull socket (snapshotter/pull/wire.py), or, when no daemon answers there, runs
snapshotter.pull.request.execute in this process."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapshotter.config import RemoteConfig

# Only argparse at import time: `lazysnap` builds every subcommand's parser on each start, and
# `lazysnap serve` must not pay for grpc/httpx imports it never uses. run() imports the rest.

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "lazysnap"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pull IMAGE into containerd with layers mounted lazily by lazysnap where the image has a "
        "lazysnap index (the rest are downloaded and unpacked as usual); afterwards "
        "`ctr -n NS run --snapshotter lazysnap IMAGE ...` runs it."
    )
    parser.add_argument("image", metavar="IMAGE", help="image reference, e.g. registry/repo:tag")
    parser.add_argument(
        "--address",
        "-a",
        default=DEFAULT_ADDRESS,
        help=f"containerd socket (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default=DEFAULT_NAMESPACE,
        help=f"containerd namespace (default {DEFAULT_NAMESPACE}; CRI uses k8s.io)",
    )
    parser.add_argument(
        "--platform", default=None, help="os/arch[/variant] to pull (default: this machine)"
    )
    parser.add_argument(
        "--plain-http", action="store_true", help="talk plain http to the image's registry"
    )
    parser.add_argument(
        "--hosts-dir",
        default=None,
        metavar="DIR",
        help="containerd-style hosts directory (DIR/<registry>/hosts.toml)",
    )
    parser.add_argument(
        "--snapshotter",
        default=DEFAULT_SNAPSHOTTER,
        help=f"containerd snapshotter to unpack into (default {DEFAULT_SNAPSHOTTER})",
    )
    parser.add_argument(
        "--daemon-address",
        default=None,
        metavar="SOCKET",
        help="the snapshots socket of the local `lazysnap serve`, whose pull socket runs the pull "
        "(it has grpc and its registry connections loaded: ~0.25 s faster); default: the "
        "address in its config (--daemon-config), else /run/lazysnap/lazysnap.sock",
    )
    parser.add_argument(
        "--daemon-config",
        default=None,
        metavar="FILE",
        help="the config of the local `lazysnap serve` (default /etc/lazysnap/config.toml if it "
        "exists): its address, its root (where it records why a layer was not lazy) and its "
        "registry settings (this pull warns where they differ from its own)",
    )
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="pull in this process even when `lazysnap serve` could run it",
    )


def _warn(message: str) -> None:
    print(f"lazysnap pull: warning: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"lazysnap pull: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from snapshotter.pull.request import PullRequest, execute, failure_message
    from snapshotter.remote.docker_config import default_docker_config_path

    atexit.register(_skip_final_collection)
    request = PullRequest(
        image=args.image,
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        platform=args.platform,
        plain_http=args.plain_http,
        hosts_dir=args.hosts_dir,
        docker_config=default_docker_config_path(),
    )
    from snapshotter.config import ConfigError

    try:
        daemon = _daemon_config(args)
    except ConfigError as err:
        return _fail(str(err))
    if not args.no_daemon:
        from snapshotter.pull.wire import DaemonUnavailable, pull_socket_for, pull_via_daemon

        socket_path = pull_socket_for(daemon.address)
        try:
            problem = pull_via_daemon(socket_path, request, sys.stdout, sys.stdout.isatty(), _warn)
        except DaemonUnavailable:
            pass  # no daemon here: pull in this process
        except KeyboardInterrupt:
            return _fail(f"pulling {args.image}: interrupted")
        else:
            return 0 if problem is None else _fail(problem)

    from snapshotter.pull.daemon_settings import daemon_setting_warnings
    from snapshotter.pull.progress import TerminalProgress

    # A daemon started without DOCKER_CONFIG (as its systemd unit is) reads ~/.docker of root.
    daemon_docker_config = os.path.join(os.path.expanduser("~root"), ".docker", "config.json")
    for warning in daemon_setting_warnings(request, daemon.remote, daemon_docker_config):
        _warn(warning)
    progress = TerminalProgress()
    root = daemon.root

    def why_not_lazy(key: str) -> str | None:
        from snapshotter.core.fallbacks import find_fallback

        found = find_fallback(root, key)
        return found.summary if found is not None else None

    try:
        summary = execute(request, progress, why_not_lazy)
    except KeyboardInterrupt:
        return _fail(f"pulling {args.image}: interrupted")
    except Exception as err:
        message = failure_message(request, err)
        if message is None:
            raise
        return _fail(message)
    progress.summary(summary)
    return 0


@dataclass(frozen=True)
class _DaemonPlaces:
    address: str  # its snapshots socket
    root: str  # its state directory
    remote: RemoteConfig  # its registry settings ([remote])


def _daemon_config(args: argparse.Namespace) -> _DaemonPlaces:
    """Where the local `lazysnap serve` listens, keeps its state, and how it reaches
    registries: from --daemon-config, else its default config file if there is one (ignored if
    broken: `serve` would not start with it either), else the defaults; --daemon-address
    overrides the address. ConfigError: --daemon-config names a file that is not a config."""
    from snapshotter.config import (
        DEFAULT_ADDRESS,
        DEFAULT_CONFIG_PATH,
        DEFAULT_ROOT,
        ConfigError,
        RemoteConfig,
        load_config,
    )

    address, root, remote = DEFAULT_ADDRESS, DEFAULT_ROOT, RemoteConfig()
    if args.daemon_config:
        config = load_config(args.daemon_config)  # named on purpose: a bad one is an error
        address, root, remote = config.address, config.root, config.remote
    elif os.path.exists(DEFAULT_CONFIG_PATH):
        try:
            config = load_config(DEFAULT_CONFIG_PATH)
            address, root, remote = config.address, config.root, config.remote
        except ConfigError:
            pass
    return _DaemonPlaces(str(args.daemon_address or address), os.path.abspath(root), remote)


def _skip_final_collection() -> None:
    """Called at exit: the interpreter's own clean-up then runs full GC passes over every
    grpc/protobuf/httpx object loaded (0.25-0.35 s here, a third of a lazy pull's wall time).
    Frozen objects are left out of those passes; the process is ending, so nothing leaks."""
    gc.freeze()
