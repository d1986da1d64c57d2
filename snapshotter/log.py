"""Logging setup shared by every `lazysnap` subcommand: plain lines on stderr."""

from __future__ import annotations

import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str) -> None:
    """Send the "lazysnap" loggers to stderr at level (one of LOG_LEVELS)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger("lazysnap")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
