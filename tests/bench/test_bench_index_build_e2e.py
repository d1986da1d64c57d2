"""bench.index_build_e2e against the real registry: a --quick run times `gzip -dc` and
`lazysnap index build` (this checkout and a baseline revision) and each build indexed the
layer from scratch (a fresh repository per run: no cache hit, no artifact already there);
--stages adds the builder's CPU seconds by stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]  # `python -m bench.index_build_e2e` runs here


def test_quick_run_times_every_command_and_builds_from_scratch() -> None:
    argv = [
        "-m",
        "bench.index_build_e2e",
        "--quick",
        "--trials",
        "2",
        "--baseline",
        "HEAD",
        "--stages",
    ]
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| `gzip -dc` of the layer blobs (reference)",
        "| `lazysnap index build`",
        "| `lazysnap index build` @ HEAD",
    ]
    assert "| 1.00x |" in rows[0]
    summaries = [line for line in result.stdout.splitlines() if "last run:" in line]
    assert len(summaries) == 2
    for summary in summaries:  # indexed now, not reused from a cache or an earlier trial
        assert "1 layer indexed, 0 reused, 0 already indexed" in summary
    assert result.stderr.count("trial ") == 2
    tables = [line.strip(" |").split(" | ") for line in result.stdout.splitlines()]
    stages = {
        cells[0]: float(cells[1])
        for cells in tables
        if len(cells) == 2 and cells[1][0] in "0123456789"
    }
    for stage in ("inflate alone", "tar parser", "whole builder", "reference: `gzip -dc`"):
        assert any(name.startswith(stage) and seconds > 0 for name, seconds in stages.items())
