"""The `lazysnap status` subcommand: its arguments, and printing the table or the JSON.

Imports only the standard library and the config at module level: `lazysnap` builds every
subcommand's parser on each start, and `serve` must not load FUSE or index code for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from snapshotter.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show lazily mounted layers (fetch progress, cache, mount processes) and whether the "
        "daemon runs, read from the daemon's root on disk: works while `serve` is down."
    )
    parser.add_argument("--root", help="the daemon's state directory (overrides the config)")
    parser.add_argument(
        "--config",
        help=f"the daemon's TOML config (default: {DEFAULT_CONFIG_PATH} if it exists, "
        "else built-in defaults)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    try:
        config = load_config(path, root=args.root)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from snapshotter.status.collect import collect_status
    from snapshotter.status.model import StatusError
    from snapshotter.status.render import render

    try:
        status = collect_status(config)
    except StatusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        sys.stdout.write(render(status))
    return 0
