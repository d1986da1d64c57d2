"""The service's shared secret for webhooks and its task API, read from --token-file (by
`accel serve` and by `accel tasks --url`)."""

from __future__ import annotations

import os
import stat
import sys


class ConfigurationError(Exception):
    """A flag or file the service cannot start with; the message names it."""


def read_token(path: str) -> str:
    """The token in path (surrounding whitespace stripped). ConfigurationError naming the
    file if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--token-file {path}: cannot read: {exc}") from None
    if not token:
        raise ConfigurationError(f"--token-file {path}: the file is empty")
    if any(ch.isspace() for ch in token):
        raise ConfigurationError(f"--token-file {path}: the token contains whitespace")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"warning: --token-file {path} is readable by group or others (chmod 600 it)",
            file=sys.stderr,
        )
    return token
