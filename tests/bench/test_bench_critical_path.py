"""critical_path.py's pure parts: the trace format its sitecustomize writes, the per-step and
summary tables docs/benchmarks.md quotes, and the hook itself in a real interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import critical_path
from bench.critical_path_steps import TraceError, parse_trace, summary_table, trial_steps
from bench.critical_path_trials import TRACE_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = 1000.0


def _line(pid: int, role: str, event: str, start: float, duration: float | None = None) -> str:
    took = "" if duration is None else f"{duration:.6f}"
    return f"{pid}\t{role}\t{event}\t{T0 + start:.6f}\t{took}\n"


def _trace(prepare_ms: float, serve_at: float) -> str:
    """One traced trial: a pull with two Prepares, a daemon, one mount process."""
    return "".join(
        [
            _line(10, "pull", "proc-start", 0.030),
            _line(10, "pull", "import:snapshotter.pull.containerd_api", 0.100, 0.090),
            _line(10, "pull", "command:run", 0.300, 0.500),
            _line(10, "pull", "client:RegistryClient.get_manifest", 0.310, 0.095),
            _line(10, "pull", "containerd_api:ContainerdClient.prepare_snapshot", 0.43, prepare_ms),
            _line(10, "pull", "containerd_api:ContainerdClient.prepare_snapshot", 0.70, 0.020),
            _line(10, "pull", "proc-exit", 0.810),
            _line(20, "daemon", "proc-start", -2.0),
            _line(20, "daemon", "client:RegistryClient.get_manifest", 0.44, 0.006),
            _line(20, "daemon", "codec:decode_index", 0.50, 0.012),
            _line(20, "daemon", "codec:decode_index", 0.55, 0.048),
            _line(30, "mount", "proc-start", 0.640),
            _line(30, "mount", "import:snapshotter.fs.reader", 0.70, 0.100),
            _line(30, "mount", "import:snapshotter.index.codec", 0.80, 0.050),
            _line(30, "mount", "import:snapshotter.pull.command", 0.85, 0.300),  # not a mount's
            _line(30, "mount", "tree:LayerTree.from_index", 0.90, 0.039),
            _line(30, "mount", "fuse_ops:serve", serve_at),
        ]
    )


def _record(
    variant: str, trial: int, pull: float, total: float, ready: list[float]
) -> dict[str, object]:
    return {
        "variant": variant,
        "path": f"/x/{variant}",
        "image": "pybig",
        "trial": trial,
        "trace_level": "full",
        "trace": f"trace-{variant}-pybig-{trial}.log",
        "t0": T0,
        "pull_s": pull,
        "total_s": total,
        "exit_gap_s": 0.012,
        "start_gap_s": 0.030,
        "ready_after_s": ready,
        "waited_s": [],
    }


def test_steps_come_from_the_trace_relative_to_the_pull_start() -> None:
    events = parse_trace(_trace(0.109, 0.990).splitlines(keepends=True))
    steps = trial_steps(_record("new", 0, 0.55, 1.49, [0.26, 0.37, 0.31]), events)
    assert steps["pull: exec -> command run starts"] == pytest.approx(0.300)
    assert steps["pull: Prepare of layer 1, round trip"] == pytest.approx(0.109)
    assert steps["pull: Prepare of layer 2, round trip"] == pytest.approx(0.020)
    assert steps["daemon: first registry request (get_manifest)"] == pytest.approx(0.006)
    assert steps["daemon: decode of the largest index"] == pytest.approx(0.048)
    # Only the mount's own imports count; the stray pull.command import does not.
    assert steps["mount 1: imports (reader, cache, blob_source, tree, codec)"] == pytest.approx(
        0.150
    )
    assert steps["mount 1: process start -> FUSE serve starts"] == pytest.approx(0.350)
    assert steps["mount 1: open_blob_source"] is None  # not in this trace
    assert steps["mounts: last ready after its Prepare (daemon log)"] == 0.37


def test_steps_command_prints_medians_per_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = []
    for trial, (before_ms, after_ms) in enumerate([(0.227, 0.109), (0.300, 0.100), (0.200, 0.120)]):
        for variant, prepare in (("base", before_ms), ("new", after_ms)):
            record = _record(variant, trial, 0.5, 1.5, [0.3])
            (tmp_path / str(record["trace"])).write_text(_trace(prepare, 0.99))
            records.append(record)
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert critical_path.main(["steps", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| step | base | new |\n|---|---|---|\n")
    assert "| pull: Prepare of layer 1, round trip | 227 ms | 109 ms |" in table
    assert "| mount 1: open_blob_source | - | - |" in table
    assert "| daemon: first registry request (get_manifest) | 6.0 ms | 6.0 ms |" in table


def test_summary_gives_medians_and_mount_ready_times_in_order() -> None:
    records = [
        _record("base", 0, 0.84, 1.66, [0.44, 0.34, 0.46]),
        _record("new", 0, 0.55, 1.49, [0.31, 0.26, 0.37]),
        _record("base", 1, 0.90, 1.70, [0.40, 0.30, 0.50]),
        _record("new", 1, 0.57, 1.51, [0.27, 0.35, 0.33]),
    ]
    table = summary_table(records)
    assert table.startswith("| figure | base (n=2) | new (n=2) |\n")
    assert "| pybig: `lazysnap pull` | 0.87 s | 0.56 s |" in table
    assert "| pybig: pull + first run | 1.68 s | 1.50 s |" in table
    assert (
        "| pybig: mounts ready after their Prepare (daemon log) | 0.32 / 0.42 / 0.48 s | "
        "0.27 / 0.32 / 0.36 s |" in table
    )
    assert "| pybig: pull exit after its main returns | 12 ms | 12 ms |" in table


def test_bad_trace_and_missing_results_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TraceError, match=r"t\.log:2: expected 5 tab-separated fields"):
        parse_trace([_line(1, "pull", "proc-start", 0), "1 pull proc-exit 2\n"], "t.log")
    assert critical_path.main(["summary", str(tmp_path / "nowhere.jsonl")]) == 1
    assert "nowhere.jsonl" in capsys.readouterr().err


def test_hook_traces_a_real_interpreter(tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{TRACE_DIR}{os.pathsep}{REPO_ROOT}",
        "LAZYSNAP_TRACE": str(trace),
        "LAZYSNAP_TRACE_LEVEL": "full",
    }
    script = (
        "from snapshotter.index.codec import decode_index\n"
        "try:\n    decode_index(b'not an index')\nexcept Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    events = parse_trace(trace.read_text().splitlines(), str(trace))
    names = [event.name for event in events]
    assert names[0] == "proc-start" and names[-1] == "proc-exit"
    assert "import:snapshotter.index.codec" in names
    decode = next(event for event in events if event.name == "codec:decode_index")
    assert decode.duration is not None and decode.duration >= 0
    assert {event.role for event in events} == {"other:-c"}
    assert not [name for name in names if name.startswith("missing:")]
