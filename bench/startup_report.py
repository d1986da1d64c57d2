"""Turn results.jsonl into the markdown report and one PNG per link.

Every figure is a median over trials with its min-max; every ratio compares lazysnap with the
full pull of the same run (the machine is shared and noisy: never compare across runs).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bench.startup_workloads import (
    FULL,
    LAZY,
    LAZY_MODES,
    LAZY_NO_STATIC,
    LAZY_PROFILE,
    LAZY_PROFILE_NO_PACK,
    LAZY_READ_AROUND,
    LAZY_START_RA4M,
    WORKLOADS,
    TrialResult,
    Workload,
)

MB = 1e6
MODE_LABELS = {
    FULL: "full pull (overlayfs)",
    LAZY: "lazysnap",
    LAZY_PROFILE: "lazysnap + profile",
    LAZY_PROFILE_NO_PACK: "lazysnap + profile, no pack",
    LAZY_NO_STATIC: "lazysnap, no static profile",
    LAZY_START_RA4M: "lazysnap, 4 MiB start read-ahead",
    LAZY_READ_AROUND: "lazysnap, read-around 256 KiB",
}
MODE_COLORS = {
    FULL: "#888888",
    LAZY: "#2a7ab9",
    LAZY_PROFILE: "#e08a1e",
    LAZY_PROFILE_NO_PACK: "#8a5a1e",
    LAZY_NO_STATIC: "#7fb2d9",
    LAZY_START_RA4M: "#5a5a5a",
    LAZY_READ_AROUND: "#8c564b",
}


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    n: int

    def text(self, fmt: str) -> str:
        if self.n == 1:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} [{self.low:{fmt}}-{self.high:{fmt}}]"


def stat(values: Iterable[float | None]) -> Stat | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Stat(statistics.median(present), min(present), max(present), len(present))


@dataclass(frozen=True)
class Metric:
    label: str
    value: Callable[[TrialResult], float | None]
    fmt: str
    better: str  # "lower" or "higher": how to read the ratio


def _read_rate(seconds: float | None, result: TrialResult) -> float | None:
    if seconds is None or result.read_bytes is None or seconds <= 0:
        return None
    return result.read_bytes / seconds / MB


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB


METRICS = (
    Metric("pull s", lambda r: r.pull_s, ".2f", "lower"),
    Metric("pull + first run s", lambda r: r.pull_first_run_s, ".2f", "lower"),
    Metric("second run s", lambda r: r.second_run_s, ".3f", "lower"),
    Metric("layers local after s", lambda r: r.converge_s, ".1f", "lower"),
    Metric("converged run s", lambda r: r.converged_run_s, ".3f", "lower"),
    Metric("MB fetched during pull", lambda r: _mb(r.bytes_pull), ".1f", "lower"),
    Metric("MB fetched by pull + first run", lambda r: _mb(r.bytes_first_run), ".1f", "lower"),
    Metric("MB fetched", lambda r: _mb(r.bytes_total), ".1f", "lower"),
    Metric("registry blob GETs", lambda r: r.blob_requests, ".0f", "lower"),
    Metric("layers mounted lazily", lambda r: r.lazy_layers, ".0f", "higher"),
)
READ_METRICS = (
    Metric("cold read MB/s", lambda r: _read_rate(r.read_cold_s, r), ".0f", "higher"),
    Metric("warm read MB/s", lambda r: _read_rate(r.read_warm_s, r), ".0f", "higher"),
    Metric("converged read MB/s", lambda r: _read_rate(r.read_converged_s, r), ".0f", "higher"),
)


def load(path: Path) -> tuple[dict[str, Any], list[TrialResult]]:
    """The run header record and the trial records of a results.jsonl (later headers, e.g.
    link measurements, are merged into the first)."""
    header: dict[str, Any] = {}
    trials: list[TrialResult] = []
    names = {f.name for f in fields(TrialResult)}
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            if record.get("kind") == "trial":
                trials.append(TrialResult(**{k: v for k, v in record.items() if k in names}))
            elif record.get("kind") == "link":
                header.setdefault("links", {})[record["link"]] = record
            else:
                header.update(record)
    return header, trials


def _select(
    trials: Sequence[TrialResult], link: str, workload: str, mode: str
) -> list[TrialResult]:
    return [
        t
        for t in trials
        if t.link == link and t.workload == workload and t.mode == mode and t.error is None
    ]


def summary(
    trials: Sequence[TrialResult], link: str, workload: str, metric: Metric, mode: str = LAZY
) -> tuple[Stat | None, Stat | None]:
    """(full pull, mode) for one cell of the table."""
    return (
        stat(metric.value(t) for t in _select(trials, link, workload, FULL)),
        stat(metric.value(t) for t in _select(trials, link, workload, mode)),
    )


def modes_run(trials: Sequence[TrialResult]) -> list[str]:
    """The lazy configurations of the run, in table order."""
    return [mode for mode in LAZY_MODES if any(t.mode == mode for t in trials)]


def _ratio(full: Stat | None, lazy: Stat | None) -> str:
    if full is None or lazy is None or full.median == 0:
        return "-"
    return f"{lazy.median / full.median:.2f}x"


def workloads_run(trials: Sequence[TrialResult], link: str) -> list[Workload]:
    return [w for w in WORKLOADS if any(t.workload == w.name and t.link == link for t in trials)]


def link_table(trials: Sequence[TrialResult], link: str) -> list[str]:
    modes = modes_run(trials)
    labels = [MODE_LABELS[mode] for mode in modes]
    lines = [
        "| workload | metric | full pull (overlayfs) | "
        + " | ".join(labels)
        + " | "
        + " | ".join(f"{label} / full" for label in labels)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(modes)),
    ]
    for workload in workloads_run(trials, link):
        metrics = METRICS + (READ_METRICS if workload.expect is None else ())
        for metric in metrics:
            pairs = [summary(trials, link, workload.name, metric, mode) for mode in modes]
            full = pairs[0][0]
            cells = [s.text(metric.fmt) if s else "-" for s in (full, *(p[1] for p in pairs))]
            ratios = [_ratio(full, lazy) for _, lazy in pairs]
            lines.append(
                f"| {workload.title} | {metric.label} | {' | '.join(cells)} | "
                f"{' | '.join(ratios)} |"
            )
    return lines


def _errors(trials: Sequence[TrialResult]) -> list[str]:
    return [
        f"- {t.link} trial {t.trial} {t.workload} {t.mode}: {t.error}"
        for t in trials
        if t.error is not None
    ]


def _goal_rows(
    header: dict[str, Any], trials: Sequence[TrialResult], links: list[str]
) -> list[str]:
    """The issue's goals, as figures of this run (met / not met), never as assertions; one row
    per lazy configuration."""
    by_label = {m.label: m for m in METRICS + READ_METRICS}
    rows = ["| goal | link | configuration | figure | met |", "|---|---|---|---|---|"]

    def add(goal: str, link: str, mode: str, figure: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "no")
        rows.append(f"| {goal} | {link} | {MODE_LABELS[mode]} | {figure} | {verdict} |")

    def versus(lazy: Stat, full: Stat, fmt: str) -> tuple[str, float]:
        ratio = lazy.median / full.median
        return f"{lazy.median:{fmt}} s vs {full.median:{fmt}} s = {ratio:.2f}x", ratio

    for link in links:
        for mode in modes_run(trials):
            full, lazy = summary(trials, link, "py-import", by_label["pull + first run s"], mode)
            if full and lazy:
                figure, ratio = versus(lazy, full, ".2f")
                add(
                    "pull + import numpy,pandas <= 0.1x full pull", link, mode, figure, ratio <= 0.1
                )
            _, lazy = summary(trials, link, "py-print", by_label["pull + first run s"], mode)
            if lazy:
                add(
                    "pull + print(1) <= 1.5 s",
                    link,
                    mode,
                    f"{lazy.median:.2f} s",
                    lazy.median <= 1.5,
                )
            for workload in WORKLOADS:
                for run in ("second run", "converged run"):
                    full, lazy = summary(trials, link, workload.name, by_label[f"{run} s"], mode)
                    if full and lazy:
                        figure, ratio = versus(lazy, full, ".3f")
                        add(
                            f"{run} <= 1.1x full ({workload.name})",
                            link,
                            mode,
                            figure,
                            ratio <= 1.1,
                        )
        _bytes_goal_rows(header, trials, link, add)
        _read_goal_rows(header, trials, link, add)
    return rows


Adder = Callable[[str, str, str, str, "bool | None"], None]


def _bytes_goal_rows(
    header: dict[str, Any], trials: Sequence[TrialResult], link: str, add: Adder
) -> None:
    """Bytes fetched by pull + first run against the compressed size of the spans holding the
    bytes the workload reads. Without a profile, a lazy layer fetches exactly the spans its
    reads touch (each span once, whole), so the plain lazysnap run's figure *is* that size for
    the python workloads; the profiled run is compared with it. seqread reads its whole file,
    i.e. every span of its data layer."""
    metric = next(m for m in METRICS if m.label == "MB fetched by pull + first run")
    for workload in ("py-print", "py-import"):
        _, needed = summary(trials, link, workload, metric, LAZY)
        _, fetched = summary(trials, link, workload, metric, LAZY_PROFILE)
        if needed and fetched and needed.median > 0:
            ratio = fetched.median / needed.median
            add(
                f"bytes fetched <= 1.5x spans read ({workload})",
                link,
                LAZY_PROFILE,
                f"{fetched.median:.1f} MB vs {needed.median:.1f} MB of spans read = {ratio:.2f}x",
                ratio <= 1.5,
            )
    seq_layer = header.get("seqread_data_layer_bytes")
    if not seq_layer:
        return
    for mode in modes_run(trials):
        _, lazy = summary(trials, link, "seqread", metric, mode)
        if lazy:
            needed_mb = seq_layer / MB
            add(
                "bytes fetched <= 1.5x spans read (seqread)",
                link,
                mode,
                f"{lazy.median:.1f} MB vs {needed_mb:.1f} MB of spans = "
                f"{lazy.median / needed_mb:.2f}x",
                lazy.median / needed_mb <= 1.5,
            )


def _read_goal_rows(
    header: dict[str, Any], trials: Sequence[TrialResult], link: str, add: Adder
) -> None:
    by_label = {m.label: m for m in READ_METRICS}
    seq_layer = header.get("seqread_data_layer_bytes")
    link_rate = header.get("links", {}).get(link, {}).get("get_mb_s")
    inflate = header.get("inflate_mb_s")
    read_bytes = next((t.read_bytes for t in trials if t.read_bytes), None)
    for mode in modes_run(trials):
        _, lazy = summary(trials, link, "seqread", by_label["cold read MB/s"], mode)
        if lazy and link_rate and inflate and seq_layer and read_bytes:
            # The link carries compressed bytes, the reader gets uncompressed ones: in file
            # bytes per second the link allows its rate x the compression ratio.
            ratio = read_bytes / seq_layer
            ceiling = min(link_rate * ratio, inflate)
            add(
                "cold sequential read >= 50% of min(link, inflate)",
                link,
                mode,
                f"{lazy.median:.0f} MB/s vs min(link {link_rate:.0f} x {ratio:.2f} compression"
                f" = {link_rate * ratio:.0f}, inflate {inflate:.0f}) = "
                f"{lazy.median / ceiling:.0%}",
                lazy.median >= 0.5 * ceiling,
            )
        for which in ("warm", "converged"):
            full, lazy = summary(trials, link, "seqread", by_label[f"{which} read MB/s"], mode)
            if full and lazy:
                add(
                    f"{which} read >= 90% of overlayfs",
                    link,
                    mode,
                    f"{lazy.median:.0f} vs {full.median:.0f} MB/s = "
                    f"{lazy.median / full.median:.0%}",
                    lazy.median >= 0.9 * full.median,
                )


def _commits(header: dict[str, Any]) -> str:
    start, end = header.get("git_commit", "?"), header.get("git_commit_end")
    return start if end in (None, start) else f"{start} (HEAD was {end} at the end)"


def markdown(header: dict[str, Any], trials: Sequence[TrialResult], plots: dict[str, str]) -> str:
    links = sorted({t.link for t in trials}, key=lambda name: (name != "loopback", name))
    out = [
        "# Startup benchmark: full pull vs lazysnap",
        "",
        f"Command: `{header.get('command', '?')}`",
        "",
        f"Run {header.get('run_id', '?')} on {header.get('hostname', '?')} "
        f"({header.get('nproc', '?')} cores, load average at start "
        f"{header.get('loadavg', '?')}), lazysnap commit {_commits(header)}, "
        f"{header.get('trials', '?')} trial(s). Each cell: median [min-max] over trials; every "
        "trial starts from a cold node (containerd + lazysnap stopped, state and cache wiped, "
        "page cache dropped).",
        "",
    ]
    images = header.get("images", {})
    if images:
        out += ["| image | layers (compressed MB) | lazysnap index build |", "|---|---|---|"]
        for name, info in images.items():
            sizes = ", ".join(f"{size / MB:.1f}" for size in info.get("layer_sizes", []))
            out.append(f"| {name} | {sizes} | {info.get('index', '-')} |")
        out.append("")
    if header.get("index_args"):
        out += [f"Index build options: `{' '.join(header['index_args'])}`.", ""]
    if "inflate_mb_s" in header:
        rate, inflater = header["inflate_mb_s"], header.get("inflater", "zlib")
        out += [f"Single-core gzip inflate ({inflater}) here: {rate:.0f} MB/s.", ""]
    for link in links:
        info = header.get("links", {}).get(link, {})
        out += [f"## Link: {link}", "", str(info.get("description", ""))]
        if "rtt_ms" in info:
            out.append(
                f"Measured: TCP connect {info['rtt_ms']:.2f} ms, whole-blob GET "
                f"{info.get('get_mb_s', 0):.0f} MB/s."
            )
        out += ["", *link_table(trials, link), ""]
        if link in plots:
            out += [f"![{link}]({plots[link]})", ""]
    out += ["## Goals (figures of this run)", "", *_goal_rows(header, trials, links), ""]
    errors = _errors(trials)
    if errors:
        out += ["## Failed trials", "", *errors, ""]
    return "\n".join(out)


def plot(trials: Sequence[TrialResult], link: str, path: Path) -> None:
    """Grouped bars per workload, one per configuration: pull + first run seconds (the pull part
    solid, the first run hatched on top), and MB fetched; whiskers are min-max over trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w.name for w in workloads_run(trials, link)]
    by_label = {m.label: m for m in METRICS}
    figure, (time_axis, bytes_axis) = plt.subplots(1, 2, figsize=(11, 4.4))
    modes = [FULL, *modes_run(trials)]
    width = 0.8 / len(modes)
    for number, mode in enumerate(modes):
        label, color = MODE_LABELS[mode], MODE_COLORS[mode]
        offset = (number - (len(modes) - 1) / 2) * width
        positions = [i + offset for i in range(len(names))]
        for axis, metric in ((time_axis, "pull + first run s"), (bytes_axis, "MB fetched")):
            stats = [
                stat(by_label[metric].value(t) for t in _select(trials, link, name, mode))
                for name in names
            ]
            heights = [s.median if s else 0.0 for s in stats]
            errors = [
                [s.median - s.low if s else 0.0 for s in stats],
                [s.high - s.median if s else 0.0 for s in stats],
            ]
            bars = axis.bar(
                positions,
                heights,
                width,
                yerr=errors,
                capsize=3,
                color=color,
                alpha=0.45 if axis is time_axis else 1.0,
                hatch="//" if axis is time_axis else None,
                label=label if axis is bytes_axis else None,
            )
            labels = [f"{s.median:.1f}" if s else "" for s in stats]  # none: not measured
            axis.bar_label(bars, labels=labels, padding=2, fontsize=7)
        pulls = [
            stat(by_label["pull s"].value(t) for t in _select(trials, link, name, mode))
            for name in names
        ]
        time_axis.bar(
            positions,
            [s.median if s else 0.0 for s in pulls],
            width,
            color=color,
            label=f"{label}: pull (hatched: first run)",
        )
    for axis, ylabel in ((time_axis, "seconds (median)"), (bytes_axis, "MB (median)")):
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names)
        axis.set_ylabel(ylabel)
        axis.grid(axis="y", alpha=0.3)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.3)  # headroom: the legend sits above the bars
    time_axis.set_title(f"pull + first run ({link})")
    bytes_axis.set_title(f"bytes fetched from the registry ({link})")
    time_axis.legend(fontsize=8)
    bytes_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: Path, out_dir: Path, image_prefix: str = "") -> Path:
    """Write report.md and startup-<link>.png into out_dir; return the markdown's path.
    image_prefix: how the markdown refers to the PNGs (relative to where it will live)."""
    header, trials = load(results)
    plots: dict[str, str] = {}
    for link in sorted({t.link for t in trials}):
        png = out_dir / f"startup-{link}.png"
        plot(trials, link, png)
        plots[link] = f"{image_prefix}{png.name}"
    report = out_dir / "report.md"
    report.write_text(markdown(header, trials, plots))
    return report
