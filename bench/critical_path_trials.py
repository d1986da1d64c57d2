"""Cold-node trials of a lazy pull + first run, A/B over checkouts (critical_path.py trials).

Each trial: the node is made cold exactly as the start-up benchmark does it (ColdNode.reset:
containerd + `lazysnap serve` stopped, state wiped, page cache dropped, restarted) with the
daemon and `lazysnap pull` importing the variant's checkout (PYTHONPATH), then `lazysnap pull`
(timed, wall), then the first `ctr run` (timed). The tracing sitecustomize
(critical_path_trace/) is on PYTHONPATH too: at level light it only logs process start and
exit (for the pull's exit gap), at full it times ~55 functions of all three processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.critical_path_steps import parse_trace
from bench.startup_node import ColdNode
from harness.procs import HarnessError

TRACE_DIR = Path(__file__).resolve().parent / "critical_path_trace"
COMMANDS = {"busybox": ("echo", "hi"), "pybig": ("python3", "-c", "print(1)")}
EXPECTED = {"busybox": "hi", "pybig": "1"}


@dataclass(frozen=True)
class Variant:
    label: str
    path: Path  # a checkout: its snapshotter/ is what the daemon, pull and mounts import


@dataclass
class TrialRecord:
    """One line of trials.jsonl (times in seconds; t0 in epoch seconds)."""

    variant: str
    path: str
    image: str
    trial: int
    trace_level: str
    trace: str  # file name in the output dir
    t0: float
    pull_s: float
    pull_out: str
    run_s: float | None = None
    total_s: float | None = None
    output: str = ""
    exit_gap_s: float | None = None  # pull: its atexit hook ran -> the process ended
    start_gap_s: float | None = None  # pull: exec -> sitecustomize ran (python start)
    ready_after_s: list[float] = field(default_factory=list)  # daemon log, per mount
    waited_s: list[float] = field(default_factory=list)  # daemon log: Mounts waiting
    loadavg: str = ""  # 1, 5, 15 min, read just before the pull


@contextlib.contextmanager
def variant_environment(variant: Variant, trace_file: Path, level: str) -> Iterator[None]:
    """While active, processes started from here import the variant's checkout and trace to
    trace_file (the daemon is started from the variant by ColdNode.reset(checkout))."""
    keys = ("PYTHONPATH", "LAZYSNAP_TRACE", "LAZYSNAP_TRACE_LEVEL")
    saved_env = {key: os.environ.get(key) for key in keys}
    os.environ["PYTHONPATH"] = f"{TRACE_DIR}{os.pathsep}{variant.path}"
    os.environ["LAZYSNAP_TRACE"] = str(trace_file)
    os.environ["LAZYSNAP_TRACE_LEVEL"] = level
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_trial(
    node: ColdNode,
    variant: Variant,
    image: str,
    reference: str,
    trial: int,
    out_dir: Path,
    pull_argv: list[str],
    level: str,
    first_run: bool = True,
) -> TrialRecord:
    name = f"trace-{variant.label}-{image}-{trial}"
    trace_file = out_dir / f"{name}.log"
    trace_file.unlink(missing_ok=True)
    with variant_environment(variant, trace_file, level):
        node.reset(checkout=variant.path)
        containerd, daemon = node.running()
        time.sleep(0.5)  # let the daemon's start-up work (pool, metrics) finish first
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        t0 = time.time()
        pull = subprocess.run(
            [
                *pull_argv,
                reference,
                "--address",
                str(containerd.address),
                "--namespace",
                containerd.namespace,
                "--hosts-dir",
                str(node.hosts_dir),
            ],
            capture_output=True,
            text=True,
            cwd=variant.path,
            check=False,
        )
        t1 = time.time()
        if pull.returncode != 0:
            raise HarnessError(
                f"lazysnap pull {reference} ({variant.label}) failed: {pull.stderr.strip()}"
            )
        record = TrialRecord(
            variant=variant.label,
            path=str(variant.path),
            image=image,
            trial=trial,
            trace_level=level,
            trace=trace_file.name,
            t0=t0,
            pull_s=t1 - t0,
            pull_out=(pull.stdout.strip().splitlines() or [""])[-1],
            loadavg=loadavg,
        )
        events = parse_trace(trace_file.read_text().splitlines(), str(trace_file))
        pull_events = [e for e in events if e.role == "pull"]
        exits = [e.start for e in pull_events if e.name == "proc-exit"]
        starts = [e.start for e in pull_events if e.name == "proc-start"]
        record.exit_gap_s = t1 - exits[0] if exits else None
        record.start_gap_s = starts[0] - t0 if starts else None
        if first_run:
            output = containerd.run_container(
                reference,
                *COMMANDS[image],
                snapshotter="lazysnap",
                container_id=f"cp-{secrets.token_hex(4)}",
                timeout=300,
            )
            t2 = time.time()
            record.run_s, record.total_s, record.output = t2 - t1, t2 - t0, output.strip()
            if record.output != EXPECTED[image]:
                raise HarnessError(
                    f"first run of {image} ({variant.label}) printed {record.output!r}, "
                    f"not {EXPECTED[image]!r}"
                )
        log = daemon.log()
        record.ready_after_s = [float(x) for x in re.findall(r"ready after ([0-9.]+)s", log)]
        record.waited_s = [float(x) for x in re.findall(r"waited ([0-9.]+)s for lazy", log)]
        if level == "full":
            shutil.copyfile(daemon.log_path, out_dir / f"{name}.daemon.log")
            mount_logs = sorted((daemon.root / "snapshots").glob("*/*.lazysnap.log"))
            (out_dir / f"{name}.mounts.log").write_text(
                "".join(path.read_text(errors="replace") for path in mount_logs)
            )
    return record


def append_record(path: Path, record: TrialRecord) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(asdict(record), sort_keys=True) + "\n")
