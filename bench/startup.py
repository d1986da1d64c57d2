"""Startup benchmark: how fast a container starts with a full pull (containerd's overlayfs
snapshotter) and with lazysnap, from a cold node, on loopback and on a shaped link.

    sudo $PY -m bench.startup                 # 3 trials, both links, all workloads
    sudo $PY -m bench.startup --quick         # smoke run: 1 trial, loopback, small images
    sudo $PY -m bench.startup --report DIR/results.jsonl   # only redo report + plots

Per link and trial, for each workload and each configuration (full pull; lazysnap; lazysnap
with the workload's startup profile; the order rotating from trial to trial), the node
is made cold (containerd + lazysnap stopped, their state and lazysnap's cache wiped, page cache
dropped, both restarted), then: pull (timed), first run (timed), second run (timed, warm), and
the blob bytes the registry served. lazysnap's indexes are built once, before any timing.
Results: RESULTS/<run id>/results.jsonl (one JSON line per trial), report.md (medians, min-max,
ratio to the full pull of the same run), startup-<link>.png, and the daemon/pull logs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench import command_line
from bench.startup_images import (
    IndexOutcome,
    build_index,
    inflate_rate,
    lazysnap_subcommand,
    prepare_images,
    push_images,
)
from bench.startup_link import Link, Shape, loopback_link, shaped_link
from bench.startup_node import ColdNode
from bench.startup_report import write_report
from bench.startup_workloads import (
    DEFAULT_MODES,
    FULL,
    LAZY_NO_STATIC,
    LAZY_PROFILE,
    LAZY_PROFILE_NO_PACK,
    MODES,
    PROFILE_MODES,
    WORKLOADS,
    WORKLOADS_BY_NAME,
    TrialResult,
    Workload,
    daemon_config,
    measure,
    no_static_repository,
)
from harness.containerd import write_hosts_toml
from harness.images import BuiltImage, push
from harness.procs import HarnessError, unmount_all_under
from harness.registry import start_registry

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

DEFAULT_RESULTS = Path("/var/cache/lazysnap-bench")
LINKS = ("loopback", "shaped")
QUICK_WORKLOADS = ("busybox-echo", "seqread")
QUICK_SEQREAD_MB = 40  # compresses to ~18 MB: above lazysnap's 10 MiB min_layer_size


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def step_progress(where: str, step: str) -> None:
    progress(f"{where}: {step}")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.startup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 trial, loopback, {', '.join(QUICK_WORKLOADS)} "
        f"with a {QUICK_SEQREAD_MB} MB file",
    )
    parser.add_argument("--trials", type=int, default=None, help="trials per link (default 3)")
    parser.add_argument(
        "--links",
        type=_csv(LINKS),
        default=None,
        help=f"comma list of {', '.join(LINKS)} (default both)",
    )
    names = tuple(w.name for w in WORKLOADS)
    parser.add_argument(
        "--workloads",
        type=_csv(names),
        default=None,
        help=f"comma list of {', '.join(names)} (default all)",
    )
    parser.add_argument(
        "--modes",
        type=_csv(MODES),
        default=None,
        help=f"comma list of {', '.join(MODES)} (default {', '.join(DEFAULT_MODES)}; {FULL} is "
        f"the baseline of every ratio; {LAZY_NO_STATIC}: lazysnap from an index built with "
        "--no-static-profile)",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=None,
        metavar="S",
        help="after the second run, wait up to S seconds for lazysnap's layers to become plain "
        "local directories, then time a third run (default 300; 0: skip)",
    )
    parser.add_argument(
        "--seqread-mb",
        type=int,
        default=None,
        help="size of the sequential-read file in MB (default 200)",
    )
    parser.add_argument(
        "--span-size",
        default=None,
        metavar="N",
        help="`lazysnap index build --span-size` (default: the indexer's, 1M)",
    )
    parser.add_argument(
        "--file-cut-min",
        default=None,
        metavar="N",
        help="`lazysnap index build --file-cut-min` (default: the indexer's)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help=f"results directory (default {DEFAULT_RESULTS})",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSONL",
        help="only (re)write report.md and the plots from a results.jsonl",
    )
    args = parser.parse_args(argv)
    args.trials = args.trials if args.trials is not None else (1 if args.quick else 3)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    args.links = args.links or (["loopback"] if args.quick else list(LINKS))
    args.workloads = args.workloads or list(
        QUICK_WORKLOADS if args.quick else (w.name for w in WORKLOADS)
    )
    if args.converge_timeout is None:
        args.converge_timeout = 0.0 if args.quick else 300.0
    args.modes = args.modes or list(DEFAULT_MODES)
    if FULL not in args.modes:
        parser.error(f"--modes must include {FULL}: every ratio is to the full pull")
    args.seqread_mb = args.seqread_mb or (QUICK_SEQREAD_MB if args.quick else 200)
    if args.seqread_mb < 1:
        parser.error("--seqread-mb must be >= 1")
    return args


class ResultsFile:
    """results.jsonl, appended and flushed record by record (a killed run keeps its data)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")


def _git_commit() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


@contextlib.contextmanager
def _link(name: str, registry_base: Path, probe_blob: str | None) -> Iterator[Link]:
    if name == "loopback":
        with loopback_link(registry_base, probe_blob) as link:
            yield link
    else:
        with shaped_link(registry_base, Shape(), probe_blob) as link:
            yield link


def run_benchmark(args: argparse.Namespace, run_dir: Path) -> Path:
    results = ResultsFile(run_dir / "results.jsonl")
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    workloads = [WORKLOADS_BY_NAME[name] for name in args.workloads]
    image_names = {w.image for w in workloads}
    seqread_size = args.seqread_mb * 1_000_000
    images = prepare_images(args.results / "images", seqread_size, image_names, progress)
    header: dict[str, Any] = {
        "kind": "run",
        "run_id": run_dir.name,
        "command": command_line(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "trials": args.trials,
        "images": {},
    }
    probe_blob: str | None = None
    if "seqread" in images:
        layer = max(images["seqread"].layers, key=lambda layer: layer.size)
        header["seqread_data_layer_bytes"] = layer.size
        header["inflater"], header["inflate_mb_s"] = inflate_rate(images["seqread"])
        probe_blob = f"/v2/bench/seqread/blobs/{layer.digest}"
    base = Path(tempfile.mkdtemp(prefix="lzb-", dir="/tmp"))
    try:
        registry_base = base / "registry"
        # Push and index once on a loopback registry; each link then serves the same data dir.
        progress("setup: pushing images and building lazysnap indexes (not timed)")
        setup = start_registry(registry_base)
        try:
            pushed = push_images(images, setup.host)
            index_args = ["--span-size", args.span_size] if args.span_size else []
            if args.file_cut_min is not None:
                index_args += ["--file-cut-min", args.file_cut_min]
            header["index_args"] = index_args
            hosts_dir = base / "setup-hosts"
            write_hosts_toml(hosts_dir, setup.host)
            for name, image in pushed.items():
                outcome: IndexOutcome = build_index(image.reference, hosts_dir, index_args)
                state = "ok" if outcome.ok else "FAILED"
                progress(
                    f"setup: index build {name}: {state} in {outcome.seconds:.1f} s: "
                    f"{outcome.message}"
                )
                header["images"][name] = {
                    "layer_sizes": [layer.size for layer in image.layers],
                    "index": f"{state} ({outcome.seconds:.1f} s): {outcome.message}",
                }
            if LAZY_NO_STATIC in args.modes:
                header["no_static"] = index_without_static_profile(
                    images, workloads, setup.host, hosts_dir, index_args
                )
            for mode in PROFILE_MODES:
                if mode in args.modes:
                    key = "profiles" if mode == LAZY_PROFILE else "profiles_no_pack"
                    header[key] = record_profiles(
                        images, workloads, setup.host, hosts_dir, index_args, mode
                    )
        finally:
            setup.stop()
        results.append(header)
        pull_argv = lazysnap_subcommand("pull")
        for link_name in args.links:
            progress(f"{link_name}: starting the registry")
            with _link(link_name, registry_base, probe_blob) as link:
                results.append(
                    {
                        "kind": "link",
                        "link": link.name,
                        "description": link.description,
                        **link.measured,
                    }
                )
                progress(f"{link.name}: {link.description}; measured {link.measured}")
                try:
                    run_link(args, link, workloads, base / "n", results, log_dir, pull_argv)
                finally:
                    # Its access log shows every Range request: where a lazy run's bytes went.
                    shutil.copyfile(link.registry.log_path, log_dir / f"{link.name}-registry.log")
        # Others commit while a run lasts, and each cold node starts the checkout's lazysnap.
        results.append({"kind": "run", "git_commit_end": _git_commit()})
    finally:
        unmount_all_under(base)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    return results.path


def index_without_static_profile(
    images: dict[str, BuiltImage],
    workloads: list[Workload],
    registry_host: str,
    hosts_dir: Path,
    index_args: list[str],
) -> dict[str, str]:
    """Push each workload image to its own repository and index it there with
    `--no-static-profile` (the LAZY_NO_STATIC baseline). Returns the index build summaries."""
    outcomes: dict[str, str] = {}
    for name in sorted({w.image for w in workloads if w.profiled}):
        pushed = push(images[name], registry_host, no_static_repository(name))
        outcome = build_index(pushed.reference, hosts_dir, [*index_args, "--no-static-profile"])
        state = "ok" if outcome.ok else "FAILED"
        progress(f"setup: index build {name} --no-static-profile: {state}: {outcome.message}")
        outcomes[name] = f"{state} ({outcome.seconds:.1f} s): {outcome.message}"
    return outcomes


def record_profiles(
    images: dict[str, BuiltImage],
    workloads: list[Workload],
    registry_host: str,
    hosts_dir: Path,
    index_args: list[str],
    mode: str = LAZY_PROFILE,
) -> dict[str, str]:
    """Push each profiled workload's image to the mode's own repository and record the
    workload's startup profile there (`index build --profile CMD`, with `--no-pack` for
    LAZY_PROFILE_NO_PACK; its layers are already indexed, so only the profile (and pack) is
    new). Returns the index build summary per workload."""
    outcomes: dict[str, str] = {}
    pack_args = ["--no-pack"] if mode == LAZY_PROFILE_NO_PACK else []
    for workload in workloads:
        if not workload.profiled:
            continue
        pushed = push(images[workload.image], registry_host, workload.repository(mode))
        command = shlex.join(workload.command)
        outcome = build_index(
            pushed.reference, hosts_dir, [*index_args, "--profile", command, *pack_args]
        )
        state = "ok" if outcome.ok else "FAILED"
        progress(
            f"setup: profile of {workload.name} ({command}): {state} in "
            f"{outcome.seconds:.1f} s: {outcome.message}"
        )
        outcomes[workload.name] = f"{state} ({outcome.seconds:.1f} s): {outcome.message}"
    return outcomes


def trial_modes(workload: Workload, chosen: list[str], trial: int) -> list[str]:
    """The configurations of one trial, rotated by the trial number: drift in machine load
    hits each configuration in turn."""
    modes = [mode for mode in workload.modes() if mode in chosen]
    shift = (trial - 1) % len(modes)
    return modes[shift:] + modes[:shift]


def run_link(
    args: argparse.Namespace,
    link: Link,
    workloads: list[Workload],
    node_base: Path,
    results: ResultsFile,
    log_dir: Path,
    pull_argv: list[str],
) -> None:
    node = ColdNode(node_base, link.registry.host, namespace=f"lzb-{os.getpid()}")
    try:
        for trial in range(1, args.trials + 1):
            for workload in workloads:
                for mode in trial_modes(workload, args.modes, trial):
                    where = f"{link.name} trial {trial}/{args.trials} {workload.name} {mode}"
                    result = TrialResult(
                        run_dir_name(results), link.name, trial, workload.name, mode
                    )
                    repository = workload.repository(mode)
                    reference = f"{link.registry.host}/{repository}:latest"
                    try:
                        progress(f"{where}: cold node")
                        node.reset(extra_config=daemon_config(mode))
                        measure(
                            node,
                            link.registry,
                            workload,
                            mode,
                            reference,
                            result,
                            pull_argv,
                            log_dir,
                            functools.partial(step_progress, where),
                            args.converge_timeout or None,
                        )
                        progress(
                            f"{where}: pull {result.pull_s:.2f} s, first run "
                            f"{result.first_run_s:.2f} s, second run {result.second_run_s:.3f} s,"
                            f" {(result.bytes_total or 0) / 1e6:.1f} MB fetched"
                            + (
                                f", local after {result.converge_s:.1f} s"
                                if result.converge_s is not None
                                else ""
                            )
                            + (
                                f", converged run {result.converged_run_s:.3f} s"
                                if result.converged_run_s is not None
                                else ""
                            )
                        )
                    except HarnessError as exc:
                        result.error = str(exc)[-2000:]
                        progress(f"{where}: FAILED: {result.error.splitlines()[0]}")
                    results.append(asdict(result))
    finally:
        node.close()


def run_dir_name(results: ResultsFile) -> str:
    return results.path.parent.name


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report is not None:
        if not args.report.is_file():
            print(f"bench.startup: error: {args.report}: no such file", file=sys.stderr)
            return 2
        try:
            report = write_report(args.report, args.report.parent)
        except (ValueError, TypeError, KeyError) as exc:
            print(f"bench.startup: error: {args.report}: {exc}", file=sys.stderr)
            return 1
        print(report)
        return 0
    if os.geteuid() != 0:
        print(
            "bench.startup: error: needs root (containerd, mounts, network namespaces, "
            "drop_caches)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    run_dir = args.results / time.strftime("%Y%m%d-%H%M%S")
    try:
        results = run_benchmark(args, run_dir)
    except KeyboardInterrupt:
        progress(f"interrupted; everything torn down; partial results in {run_dir}")
        return 130
    except HarnessError as exc:
        progress(f"failed: {exc}")
        return 1
    report = write_report(results, run_dir)
    latest = args.results / "latest"
    with contextlib.suppress(OSError):
        latest.unlink(missing_ok=True)
        latest.symlink_to(run_dir.name)
    progress(f"done: {report}")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
