"""`lazysnap` entry point: argparse subcommands, each a small function delegating to one module.

Every subcommand imports its module lazily inside its run function, so `lazysnap serve` never
loads the FUSE, HTTP or index code that other subcommands need.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter import __version__
from snapshotter.log import LOG_LEVELS

Runner = Callable[[argparse.Namespace], int]


# -- serve -------------------------------------------------------------------------------------


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve containerd's snapshots API for ROOT on a unix socket. Flags override "
        "the config file; see docs/configuration.md."
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


# -- index build | sign | show ------------------------------------------------------------------
# The command modules import only argparse-level code at import time; run() loads the rest.


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    from snapshotter.indexer import command

    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- pull --------------------------------------------------------------------------------------


def _pull_arguments(parser: argparse.ArgumentParser) -> None:
    from snapshotter.pull import command

    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- accel serve -------------------------------------------------------------------------------


def _accel_arguments(parser: argparse.ArgumentParser) -> None:
    from snapshotter.accel import command

    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- trust keygen ------------------------------------------------------------------------------


def _trust_arguments(parser: argparse.ArgumentParser) -> None:
    from snapshotter.trust import command

    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


# -- status ------------------------------------------------------------------------------------


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    from snapshotter.status import command

    command.add_arguments(parser)


# -- mount-layer -------------------------------------------------------------------------------
# Owner: fs. Add a Subcommand("mount-layer", ...) whose arguments function imports snapshotter.fs
# lazily; register it below.


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # imports the command's module


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "serve",
        "run the snapshotter daemon (containerd proxy snapshotter on a unix socket)",
        _serve_arguments,
    ),
    Subcommand(
        "index",
        "build, push and show lazysnap layer indexes of an image in its registry",
        _index_arguments,
    ),
    Subcommand(
        "pull",
        "pull an image into containerd; indexed layers stay lazy (not downloaded)",
        _pull_arguments,
    ),
    Subcommand(
        "accel",
        "acceleration service: index images as registries report their pushes",
        _accel_arguments,
    ),
    Subcommand(
        "trust",
        "keys that sign lazysnap indexes (nodes use only indexes signed by a trusted key)",
        _trust_arguments,
    ),
    Subcommand(
        "status",
        "show lazily mounted layers, the span cache and the daemon, from disk",
        _status_arguments,
    ),
)


def _chosen_command(argv: Sequence[str]) -> str | None:
    # The top-level options (-h, --version) take no value: the first other word is the command.
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with argv, only the subcommand argv names gets its arguments
    (the others are listed by name and help): building them all imports every command's
    module, ~50 ms that each `lazysnap pull` would pay."""
    parser = argparse.ArgumentParser(
        prog="lazysnap",
        description="containerd snapshotter that mounts image layers lazily over FUSE",
    )
    parser.add_argument("--version", action="version", version=f"lazysnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv) if argv is not None else None
    for command in SUBCOMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help)
        if argv is None or command.name == chosen:
            command.add_arguments(command_parser)
    return parser


EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a process SIGPIPE ended


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(words).parse_args(words)  # --help prints here
        run: Runner = args.run
        code = run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must be seen while it is caught
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()


def _stdout_gone() -> int:
    """The reader of stdout went away (`lazysnap index show IMAGE | head -1`): stop quietly,
    as a program ended by SIGPIPE would. Python ignores SIGPIPE, so a write raised instead;
    stdout now points at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
