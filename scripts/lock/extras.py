"""Print the installed distributions (space-separated) that requirements.lock does not name, so
install-deps can remove them: a venv older than the lock must not keep what the lock dropped
(a stray package changed lazysnap's behaviour once: httpcore imports trio when present)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# Installer tooling and the project itself are not in the lock.
KEEP = {"pip", "lazysnap"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_names(lock: Path) -> set[str]:
    names = set()
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            names.add(normalize(match.group(1)))
    return names


def extras(lock: Path) -> list[str]:
    wanted = locked_names(lock) | KEEP
    installed = {normalize(dist.metadata["Name"]) for dist in metadata.distributions()}
    return sorted(installed - wanted)


if __name__ == "__main__":
    sys.stdout.write(" ".join(extras(Path(sys.argv[1]))) + "\n")
