"""`python -m snapshotter.pull IMAGE ...`: the same as `lazysnap pull`, for use before (or
without) the lazysnap console script."""

from __future__ import annotations

import argparse
import sys

from snapshotter.pull import command


def main() -> int:
    parser = argparse.ArgumentParser(prog="lazysnap pull")
    command.add_arguments(parser)
    return command.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
