"""`python -m snapshotter.pull IMAGE ...`: the same as `lazysnap pull`, for use before (or
without) the lazysnap console script."""

from __future__ import annotations

import argparse
import os
import sys

from snapshotter.pull import command


def main() -> int:
    parser = argparse.ArgumentParser(prog="lazysnap pull")
    command.add_arguments(parser)
    try:
        code = command.run(parser.parse_args())
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the reader went away: quiet, as in snapshotter/cli.py
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
