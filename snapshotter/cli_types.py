"""argparse value types and options shared by the `lazysnap` subcommands (sizes, counts)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from snapshotter.index.model import (
    DEFAULT_MIN_LAYER_SIZE,
    DEFAULT_SPAN_SIZE,
    MAX_SPAN_SIZE,
    MIN_SPAN_SIZE,
)

_SIZE = re.compile(r"(\d+)\s*([kmgKMG]i?[bB]?|[bB])?")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """`4194304`, `4M`, `4MiB`, `512k`: binary units."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: e.g. 4194304, 4M, 512KiB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]


def positive_size(text: str) -> int:
    value = byte_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return value


def span_size(text: str) -> int:
    """A span size within what the builder accepts: checked while parsing the command line,
    so a bad value stops the command before any work (even when every layer is indexed
    already and no build would have seen it)."""
    value = byte_size(text)
    if not MIN_SPAN_SIZE <= value <= MAX_SPAN_SIZE:
        raise argparse.ArgumentTypeError(
            f"span size {text!r} is outside [{MIN_SPAN_SIZE}, {MAX_SPAN_SIZE}] bytes "
            "(64KiB to 64MiB)"
        )
    return value


def at_least_one(flag: str) -> Callable[[str], int]:
    """An integer >= 1 for `flag` (a count of jobs, attempts, ...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: not a number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


def add_span_size_argument(parser: argparse.ArgumentParser) -> None:
    """--span-size, for everything that builds layer indexes (`index build`, `accel serve`)."""
    parser.add_argument(
        "--span-size",
        type=span_size,
        default=DEFAULT_SPAN_SIZE,
        metavar="N",
        help="uncompressed bytes per independently readable span: the unit of every fetch, "
        f"64KiB to 64MiB (default {DEFAULT_SPAN_SIZE})",
    )


def add_min_layer_size_argument(parser: argparse.ArgumentParser) -> None:
    """--min-layer-size, for everything that builds layer indexes."""
    parser.add_argument(
        "--min-layer-size",
        type=byte_size,
        default=DEFAULT_MIN_LAYER_SIZE,
        metavar="N",
        help="compressed layers smaller than this stay unindexed and are pulled whole "
        f"(default {DEFAULT_MIN_LAYER_SIZE})",
    )
