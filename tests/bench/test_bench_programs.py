"""Every benchmark program starts as its docs say, `python -m bench.NAME` from the repository
root, and answers --help with that name (the children run by path are not programs of their own).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILDREN_RUN_BY_PATH = {"critical_path_decode", "startup_delayline"}
PROGRAMS = sorted(
    path.stem
    for path in (REPO_ROOT / "bench").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text() and path.stem not in CHILDREN_RUN_BY_PATH
)


def test_the_documented_programs_are_found() -> None:
    assert {"startup", "critical_path", "working_set", "seqread", "index_build"} <= set(PROGRAMS)


@pytest.mark.parametrize("name", PROGRAMS)
def test_help_names_the_module_to_run(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin"},  # no PYTHONPATH: the repository root is enough
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m bench.{name} ")
