"""Print the sha256 of what requirements.lock is resolved from: pyproject.toml's dependencies,
its `test` extra, its build requirements, and scripts/lock/build.in (normalized, so reordering
or comments do not count). Used by scripts/lock.sh and tests/unit/test_lock.py."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_in_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return sorted(line for line in lines if line)


def inputs_digest(repo: Path = REPO) -> str:
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    inputs = {
        "dependencies": sorted(project["project"]["dependencies"]),
        "test": sorted(project["project"]["optional-dependencies"]["test"]),
        "build-system": sorted(project["build-system"]["requires"]),
        "build.in": build_in_lines(repo / "scripts" / "lock" / "build.in"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    sys.stdout.write(inputs_digest() + "\n")
