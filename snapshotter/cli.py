"""`lazysnap` entry point: argparse subcommands, each a small function delegating to one module.

Every subcommand imports its module lazily inside its run function, so `lazysnap serve` never
loads the FUSE, HTTP or index code that other subcommands need.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from snapshotter import __version__
from snapshotter.log import LOG_LEVELS

Runner = Callable[[argparse.Namespace], int]


# -- serve -------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the snapshotter daemon (containerd proxy snapshotter on a unix socket)",
        description="Serve containerd's snapshots API for ROOT on a unix socket. Flags override "
        "the config file; see docs/configuration.md.",
    )
    parser.add_argument("--root", help="state directory (default: from config, /var/lib/lazysnap)")
    parser.add_argument("--address", help="unix socket path for containerd's proxy_plugins")
    parser.add_argument("--config", help="TOML config file (default: none, built-in defaults)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="stderr log level (default info)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from snapshotter.config import ConfigError, load_config
    from snapshotter.log import setup_logging
    from snapshotter.service.daemon import serve

    try:
        config = load_config(
            args.config, root=args.root, address=args.address, log_level=args.log_level
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    return serve(config)


# -- index build | index show ------------------------------------------------------------------
# The command modules import only argparse-level code at import time; run() loads the rest.


def _add_index(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from snapshotter.indexer import command

    parser = sub.add_parser(
        "index", help="build, push and show lazysnap layer indexes of an image in its registry"
    )
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- pull --------------------------------------------------------------------------------------


def _add_pull(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from snapshotter.pull import command

    parser = sub.add_parser(
        "pull", help="pull an image into containerd; indexed layers stay lazy (not downloaded)"
    )
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- accel serve -------------------------------------------------------------------------------


def _add_accel(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from snapshotter.accel import command

    parser = sub.add_parser(
        "accel", help="acceleration service: index images as registries report their pushes"
    )
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- status ------------------------------------------------------------------------------------


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from snapshotter import status

    parser = sub.add_parser(
        "status", help="show lazily mounted layers, the span cache and the daemon, from disk"
    )
    status.add_arguments(parser)


# -- mount-layer -------------------------------------------------------------------------------
# Owner: fs. Add `_add_mount_layer(sub)` (imports snapshotter.fs lazily); register it below.


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_serve,
    _add_index,
    _add_pull,
    _add_accel,
    _add_status,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazysnap",
        description="containerd snapshotter that mounts image layers lazily over FUSE",
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Runner = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
