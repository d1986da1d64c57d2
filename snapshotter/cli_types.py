"""argparse value types and options shared by the `lazysnap` subcommands (sizes, counts)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from snapshotter.index.model import (
    DEFAULT_FILE_CUT_MIN,
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


def file_cut_min(text: str) -> int:
    """0 (cut spans by size only) or a minimum span size up to the largest span size."""
    value = byte_size(text)
    if value > MAX_SPAN_SIZE:
        raise argparse.ArgumentTypeError(
            f"file cut minimum {text!r} is larger than the largest span size ({MAX_SPAN_SIZE})"
        )
    return value


def add_file_cut_argument(parser: argparse.ArgumentParser) -> None:
    """--file-cut-min, for `index build` (the accel service builds with the default)."""
    parser.add_argument(
        "--file-cut-min",
        type=file_cut_min,
        default=DEFAULT_FILE_CUT_MIN,
        metavar="N",
        help="also cut a span where a file's data starts once the span holds N bytes, so a "
        "small file's read fetches a few deflate blocks, not a whole span (gzip and "
        f"uncompressed layers); 0: cut by size only (default {DEFAULT_FILE_CUT_MIN})",
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
