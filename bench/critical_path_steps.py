"""Turn critical_path.py's records and traces into the tables of docs/benchmarks.md
("Critical path of a lazy pull"). Pure functions: no process, no mount, no clock.

- parse_trace(): the event lines critical_path_trace/sitecustomize.py writes.
- trial_steps(): one traced trial's steps (ms from its own events) as {step: seconds}.
- summary_rows() / steps_rows(): medians per variant, as markdown table rows.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TraceError(ValueError):
    """A trace or results file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Event:
    pid: int
    role: str  # pull, daemon, mount, other:<program>
    name: str  # proc-start, proc-exit, import:<module>, <module tail>:<function>, missing:...
    start: float  # epoch seconds
    duration: float | None  # seconds; None for instant events


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[Event]:
    """Events of a trace file (blank lines skipped); a malformed line is a TraceError."""
    events: list[Event] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 5:
            raise TraceError(f"{source}:{number}: expected 5 tab-separated fields: {line!r}")
        pid, role, name, start, duration = fields
        try:
            events.append(
                Event(int(pid), role, name, float(start), float(duration) if duration else None)
            )
        except ValueError:
            raise TraceError(f"{source}:{number}: bad pid, start or duration: {line!r}") from None
    return events


@dataclass
class Timeline:
    """One trial's events, grouped by process."""

    events: list[Event]
    by_pid: dict[int, list[Event]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_pid = {}
        for event in sorted(self.events, key=lambda e: e.start):
            self.by_pid.setdefault(event.pid, []).append(event)

    def pids(self, role: str) -> list[int]:
        """Processes of a role in the order they started."""
        return [pid for pid, events in self.by_pid.items() if events[0].role == role]

    def first(self, pid: int, name: str) -> Event | None:
        return next((e for e in self.by_pid.get(pid, []) if e.name == name), None)

    def durations(self, pid: int, name: str) -> list[float]:
        return [
            e.duration
            for e in self.by_pid.get(pid, [])
            if e.name == name and e.duration is not None
        ]


def _duration(event: Event | None) -> float | None:
    return None if event is None else event.duration


# The mount process's own imports that sit on its critical path (before FUSE serves).
MOUNT_IMPORTS = (
    "import:snapshotter.fs.reader",
    "import:snapshotter.fs.cache",
    "import:snapshotter.fs.blob_source",
    "import:snapshotter.fs.tree",
    "import:snapshotter.index.codec",
)


def trial_steps(record: Mapping[str, Any], events: Sequence[Event]) -> dict[str, float | None]:
    """The steps of one traced trial (seconds; None where the trace lacks the event). record
    is the trial's line of trials.jsonl (t0: when `lazysnap pull` was started)."""
    timeline = Timeline(list(events))
    t0 = float(record["t0"])
    steps: dict[str, float | None] = {}
    pulls = timeline.pids("pull")
    if pulls:
        pull = pulls[0]
        run = timeline.first(pull, "command:run")
        steps["pull: exec -> command run starts"] = None if run is None else run.start - t0
        steps["pull: import containerd_api (grpc + protobuf)"] = _duration(
            timeline.first(pull, "import:snapshotter.pull.containerd_api")
        )
        steps["pull: first registry request (get_manifest)"] = _duration(
            timeline.first(pull, "client:RegistryClient.get_manifest")
        )
        prepares = timeline.durations(pull, "containerd_api:ContainerdClient.prepare_snapshot")
        for number, seconds in enumerate(prepares, 1):
            steps[f"pull: Prepare of layer {number}, round trip"] = seconds
        steps["pull: Puller.pull"] = _duration(timeline.first(pull, "puller:Puller.pull"))
        # Newer checkouts resolve the image (pull/resolve.py) beside the grpc import and then
        # call Puller.unpack; Puller.pull is no longer called there.
        steps["pull: resolve_image (manifest + config)"] = _duration(
            timeline.first(pull, "resolve:resolve_image")
        )
        steps["pull: Puller.unpack"] = _duration(timeline.first(pull, "puller:Puller.unpack"))
    steps["pull: exit after main returns"] = record.get("exit_gap_s")
    steps["pull: wall"] = record.get("pull_s")
    daemons = timeline.pids("daemon")
    if daemons:
        daemon = daemons[0]
        steps["daemon: first registry request (get_manifest)"] = _duration(
            timeline.first(daemon, "client:RegistryClient.get_manifest")
        )
        steps["daemon: discovery of layer 1"] = _duration(
            timeline.first(daemon, "discover:IndexDiscovery.__call__")
        )
        # In call order: the image's layers, then the first run's container snapshot.
        for number, took in enumerate(
            timeline.durations(daemon, "snapshotter:Snapshotter.prepare"), 1
        ):
            steps[f"daemon: Prepare call {number}"] = took
        decodes = timeline.durations(daemon, "codec:decode_index")
        steps["daemon: decode of the largest index"] = max(decodes) if decodes else None
    for number, mount in enumerate(timeline.pids("mount"), 1):
        label = f"mount {number}"
        started = timeline.first(mount, "proc-start")
        serving = timeline.first(mount, "fuse_ops:serve")
        imports = [
            e.duration
            for e in timeline.by_pid[mount]
            if e.name in MOUNT_IMPORTS and e.duration is not None
        ]
        steps[f"{label}: imports (reader, cache, blob_source, tree, codec)"] = (
            sum(imports) if imports else None
        )
        steps[f"{label}: decode_index"] = _duration(timeline.first(mount, "codec:decode_index"))
        steps[f"{label}: tree build"] = _duration(
            timeline.first(mount, "tree:LayerTree.from_index")
        )
        steps[f"{label}: open_blob_source"] = _duration(
            timeline.first(mount, "blob_source:open_blob_source")
        )
        steps[f"{label}: process start -> FUSE serve starts"] = (
            serving.start - started.start if serving and started else None
        )
    ready = record.get("ready_after_s") or []
    steps["mounts: last ready after its Prepare (daemon log)"] = max(ready) if ready else None
    waited = record.get("waited_s") or []
    steps["first run: waited for mounts (max)"] = max(waited) if waited else 0.0
    steps["pull + first run (wall)"] = record.get("total_s")
    return steps


def load_records(path: Path) -> list[dict[str, Any]]:
    """The trial records of a trials.jsonl."""
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(record, dict) or "variant" not in record or "t0" not in record:
            raise TraceError(f"{path}:{number}: not a trial record (no variant/t0)")
        records.append(record)
    return records


def variants_in_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        seen.setdefault(str(record["variant"]), None)
    return list(seen)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ms(value: float | None) -> str:
    """Milliseconds, with decimals only where they matter: "227 ms", "3.0 ms", "0.04 ms"."""
    if value is None:
        return "-"
    millis = value * 1000
    places = 0 if millis >= 10 else 1 if millis >= 1 else 2
    return f"{millis:.{places}f} ms"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def steps_table(per_trial: Sequence[tuple[str, Mapping[str, float | None]]]) -> str:
    """Median of each step per variant (columns in first-seen order), in ms.
    per_trial: (variant, trial_steps()) for every traced trial."""
    variants = list(dict.fromkeys(variant for variant, _ in per_trial))
    steps = list(dict.fromkeys(step for _, trial in per_trial for step in trial))
    rows = []
    for step in steps:
        cells = [
            ms(_median(trial.get(step) for variant, trial in per_trial if variant == column))
            for column in variants
        ]
        rows.append([step, *cells])
    return table(["step", *variants], rows)


def _ready_cell(records: Sequence[Mapping[str, Any]]) -> str:
    """Median of each mount's ready-after time, mounts sorted by it: "0.26 / 0.31 / 0.37 s"."""
    ranked = [sorted(r.get("ready_after_s") or []) for r in records]
    count = max((len(r) for r in ranked), default=0)
    if count == 0:
        return "-"
    medians = [_median(r[i] if i < len(r) else None for r in ranked) for i in range(count)]
    return " / ".join("-" if m is None else f"{m:.2f}" for m in medians) + " s"


def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Whole-run figures per image and variant: medians over the trials (n in the header)."""
    variants = variants_in_order(records)
    images = list(dict.fromkeys(str(r["image"]) for r in records))
    header = ["figure"]
    for variant in variants:
        count = len({r["trial"] for r in records if r["variant"] == variant})
        header.append(f"{variant} (n={count})")
    rows: list[list[str]] = []
    for image in images:
        chosen = {
            v: [r for r in records if r["variant"] == v and r["image"] == image] for v in variants
        }

        def median_of(key: str, variant: str) -> float | None:
            return _median(r.get(key) for r in chosen[variant])  # noqa: B023

        rows.append(
            [f"{image}: `lazysnap pull`", *(seconds(median_of("pull_s", v)) for v in variants)]
        )
        rows.append(
            [f"{image}: pull + first run", *(seconds(median_of("total_s", v)) for v in variants)]
        )
        rows.append(
            [
                f"{image}: mounts ready after their Prepare (daemon log)",
                *(_ready_cell(chosen[v]) for v in variants),
            ]
        )
        rows.append(
            [
                f"{image}: first run waited for mounts (max)",
                *(
                    seconds(_median(max(r.get("waited_s") or [0.0]) for r in chosen[v]))
                    for v in variants
                ),
            ]
        )
        rows.append(
            [
                f"{image}: pull exit after its main returns",
                *(ms(median_of("exit_gap_s", v)) for v in variants),
            ]
        )
        rows.append(
            [
                f"{image}: pull exec -> python start-up hook",
                *(ms(median_of("start_gap_s", v)) for v in variants),
            ]
        )
    return table(header, rows)
