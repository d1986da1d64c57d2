"""`lazysnap pull IMAGE`: the CLI face of snapshotter.pull.puller (wired by snapshotter/cli.py)."""

from __future__ import annotations

import argparse
import atexit
import gc
import sys
import threading
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

# Only argparse at import time: `lazysnap` builds every subcommand's parser on each start, and
# `lazysnap serve` must not pay for grpc/httpx imports it never uses. run() imports the rest.

T = TypeVar("T")
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


def _fail(message: str) -> int:
    print(f"lazysnap pull: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from snapshotter.pull.plan import ImageFormatError
    from snapshotter.pull.resolve import PullError, resolve_image
    from snapshotter.remote.auth import CredentialStore
    from snapshotter.remote.client import RegistryClient
    from snapshotter.remote.errors import RegistryError
    from snapshotter.remote.hosts import HostsConfig
    from snapshotter.remote.manifest import Platform
    from snapshotter.remote.reference import Reference

    atexit.register(_skip_final_collection)
    image: str = args.image
    try:
        ref = Reference.parse(image)
        platform = Platform.parse(args.platform) if args.platform else Platform.host()
    except ValueError as err:
        return _fail(str(err))
    hosts = HostsConfig(args.hosts_dir, plain_http=[ref.registry] if args.plain_http else [])
    try:
        with RegistryClient(hosts, CredentialStore.from_docker_config()) as registry:
            # The manifest and config requests go out while grpc and the containerd client
            # load (~0.1 s either way): they are independent until the first snapshot call.
            resolving = _in_background(resolve_image, registry, image, platform)
            from snapshotter.pull.containerd_api import ContainerdClient, ContainerdError
            from snapshotter.pull.progress import TerminalProgress
            from snapshotter.pull.puller import Puller, PullOptions

            progress = TerminalProgress()
            try:
                with ContainerdClient(args.address, args.namespace) as containerd:
                    containerd.connect()
                    options = PullOptions(snapshotter=args.snapshotter, platform=platform)
                    resolved = resolving.result()
                    summary = Puller(containerd, registry, options, progress).unpack(resolved)
            except ContainerdError as err:
                return _fail(f"pulling {image}: {err}")
    except RegistryError as err:
        return _fail(f"pulling {image}: {err}")
    except (PullError, ImageFormatError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail(f"pulling {image}: interrupted")
    progress.summary(summary)
    return 0


def _in_background(function: Callable[..., T], *args: object) -> Future[T]:
    """function(*args) on a daemon thread: a pull that fails on containerd's side returns at
    once instead of waiting for a slow registry (a pool's thread would be joined at exit)."""
    from concurrent.futures import Future

    future: Future[T] = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=work, name="resolve", daemon=True).start()
    return future


def _skip_final_collection() -> None:
    """Called at exit: the interpreter's own clean-up then runs full GC passes over every
    grpc/protobuf/httpx object loaded (0.25-0.35 s here, a third of a lazy pull's wall time).
    Frozen objects are left out of those passes; the process is ending, so nothing leaks."""
    gc.freeze()
