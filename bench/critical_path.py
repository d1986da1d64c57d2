"""Critical path of a lazy pull: where the time of a cold `lazysnap pull` + first `ctr run`
goes, A/B between checkouts (docs/benchmarks.md, "Critical path of a lazy pull").

    sudo $PY -m bench.critical_path trials OUT pybig BEFORE AFTER --trials 7
    sudo $PY -m bench.critical_path trials OUT pybig BEFORE AFTER --trials 5 --trace
    $PY -m bench.critical_path summary OUT     # whole-run figures (medians per variant)
    $PY -m bench.critical_path steps OUT       # per-step table of the --trace trials
    sudo $PY -m bench.critical_path mount-startup BEFORE AFTER --trials 9
    sudo $PY -m bench.critical_path mount-startup BEFORE AFTER --trials 7 --all-layers
    sudo $PY -m bench.critical_path mount-startup AFTER --trials 7 --zygote
    $PY -m bench.critical_path decode-tree BEFORE AFTER

A VARIANT is a checkout directory (LABEL=DIR names its column; default: the directory name)
or a git revision of this repository, exported with `git archive` for the run and removed
after. Variants are interleaved, the order alternating per trial, so load drift hits each.

trials: per trial a cold node (the start-up benchmark's ColdNode: containerd + `lazysnap
serve` on wiped state, page cache dropped; registry on loopback; indexes built once, untimed),
then `lazysnap pull` (wall) and the first run (busybox `echo hi`, pybig `python3 -c
print(1)`). OUT/trials.jsonl gets one line per trial: pull_s, run_s, total_s (pull + first
run), exit_gap_s (pull: atexit hook -> process end, i.e. interpreter shutdown), start_gap_s
(exec -> python's site hook), ready_after_s (each mount: start -> ready, daemon log) and
waited_s (the run waiting for mounts). --trace times ~55 functions of the pull, daemon and
mount processes (critical_path_trace/sitecustomize.py): slower, for `steps` only. OUT also
keeps each trial's trace (trace-VARIANT-IMAGE-N.log; with --trace the daemon and mount logs).

summary/steps print markdown tables: one row per figure or step, one column per variant,
each cell the median over that variant's trials ("-": no such event in any trial).

mount-startup: a mount process as the daemon starts it (fresh interpreter, registry blob
source, the checkout's code), timed from start to its "ready" line; one layer (the pybig
layer with the most entries) or, with --all-layers, one per pybig layer started at once until
all are ready. --zygote compares a fresh interpreter ("cold") with a fork by the daemon's
zygote ("zygote": snapshotter.fs.zygote, `[fuse] zygote`; checkouts from 4b28eec on) per
variant.
Prints the median and every trial in ms.

decode-tree: decode_index and LayerTree.from_index of the largest pybig layer's index (built
locally like `lazysnap index build`, cached), in one process per variant; ms min / median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench import command_line
from bench import critical_path_mounts as mounts
from bench.critical_path_steps import (
    TraceError,
    load_records,
    parse_trace,
    steps_table,
    summary_table,
    table,
    trial_steps,
)
from bench.critical_path_trials import COMMANDS, Variant, append_record, run_trial
from bench.startup_images import build_index, lazysnap_subcommand, prepare_images
from bench.startup_node import ColdNode
from harness.containerd import write_hosts_toml
from harness.images import push
from harness.procs import HarnessError, unmount_all_under
from harness.registry import Registry, start_registry

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

DECODE_SCRIPT = HERE / "critical_path_decode.py"
DEFAULT_CACHE = Path("/var/cache/lazysnap-bench")
IMAGES = tuple(COMMANDS)
VARIANT_HELP = "checkout DIR, LABEL=DIR, or a git revision of this repository"


def progress(message: str) -> None:
    print(f"[critical-path {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C


@dataclass(frozen=True)
class VariantArg:
    label: str
    source: str  # a directory, or a git revision of this repository


def parse_variant(text: str) -> VariantArg:
    label, sep, source = text.partition("=")
    if not sep:
        source = text
        label = Path(text.rstrip("/")).name or text
    if not label or not source:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DIR, LABEL=DIR or a git revision")
    return VariantArg(label, source)


def checkouts(args: list[VariantArg], scratch: Path) -> list[Variant]:
    """The variants as directories: revisions are exported under scratch (removed with it)."""
    variants: list[Variant] = []
    for arg in args:
        path = Path(arg.source)
        if path.is_dir():
            if not (path / "snapshotter").is_dir():
                raise HarnessError(f"variant {arg.label}: {path} has no snapshotter/ package")
            variants.append(Variant(arg.label, path.resolve()))
            continue
        target = scratch / f"checkout-{len(variants)}"
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", arg.source],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise HarnessError(
                f"variant {arg.label}: {arg.source!r} is neither a directory nor a git revision "
                f"of {REPO_ROOT} ({archive.stderr.decode(errors='replace').strip()})"
            )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        progress(f"setup: {arg.label} = {arg.source} exported to {target}")
        variants.append(Variant(arg.label, target))
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise HarnessError(f"variant labels must differ ({', '.join(labels)}): use LABEL=DIR")
    return variants


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))  # short: unix socket paths
    try:
        yield base
    finally:
        unmount_all_under(base)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


@contextlib.contextmanager
def registry_at(base: Path) -> Iterator[Registry]:
    registry = start_registry(base)
    try:
        yield registry
    finally:
        registry.stop()


def interleaved(variants: list[Variant], trial: int) -> list[Variant]:
    return variants if trial % 2 == 0 else variants[::-1]


# --- trials ---------------------------------------------------------------------------------


def cmd_trials(args: argparse.Namespace) -> int:
    out: Path = args.out
    results = out / "trials.jsonl"
    level = "full" if args.trace else "light"
    with scratch_dir() as base:
        variants = checkouts(args.variants, base)
        images = prepare_images(args.cache / "images", 0, {args.image}, progress)
        with registry_at(base / "registry") as registry:
            pushed = push(images[args.image], registry.host, f"bench/{args.image}")
            hosts = base / "setup-hosts"
            write_hosts_toml(hosts, registry.host)
            outcome = build_index(pushed.reference, hosts)
            progress(f"setup: index build {args.image}: ok={outcome.ok}: {outcome.message}")
            pull_argv = lazysnap_subcommand("pull")
            out.mkdir(parents=True, exist_ok=True)  # after setup: a failed setup leaves nothing
            (out / "command.txt").write_text(command_line() + "\n")
            node = ColdNode(base / "n", registry.host, namespace="cp")
            try:
                for trial in range(args.trials):
                    for variant in interleaved(variants, trial):
                        progress(f"trial {trial + 1}/{args.trials}: {variant.label} {args.image}")
                        record = run_trial(
                            node,
                            variant,
                            args.image,
                            pushed.reference,
                            trial,
                            out,
                            pull_argv,
                            level,
                            first_run=not args.no_run,
                        )
                        append_record(results, record)
                        total = "-" if record.total_s is None else f"{record.total_s:.2f}"
                        progress(f"  pull {record.pull_s:.2f} s, pull + first run {total} s")
            finally:
                node.close()
    print(summary_table(load_records(results)), end="")
    progress(f"records in {results}")
    return 0


def _results_path(path: Path) -> Path:
    return path / "trials.jsonl" if path.is_dir() else path


def cmd_summary(args: argparse.Namespace) -> int:
    print(summary_table(load_records(_results_path(args.out))), end="")
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    results = _results_path(args.out)
    per_trial = []
    for record in load_records(results):
        if record.get("trace_level") != "full":
            continue
        trace = results.parent / str(record["trace"])
        try:
            lines = trace.read_text().splitlines()
        except OSError as exc:
            raise TraceError(f"{trace}: {exc.strerror}") from None
        per_trial.append(
            (str(record["variant"]), trial_steps(record, parse_trace(lines, str(trace))))
        )
    if not per_trial:
        raise TraceError(f"{results}: no traced trials (run `trials ... --trace`)")
    print(steps_table(per_trial), end="")
    return 0


# --- mount-startup --------------------------------------------------------------------------


def cmd_mount_startup(args: argparse.Namespace) -> int:
    with scratch_dir() as base:
        variants = checkouts(args.variants, base)
        image = prepare_images(args.cache / "images", 0, {"pybig"}, progress)["pybig"]
        layers = mounts.layer_indexes(image, args.cache / "critical-path", progress)
        if not args.all_layers:
            layers = [max(layers, key=lambda layer: layer.entries)]
        what = ", ".join(f"{layer.entries} entries" for layer in layers)
        with registry_at(base / "registry") as registry:
            push(image, registry.host, "bench/pybig")
            columns: dict[str, list[float]] = {}
            for trial in range(args.trials):
                for variant in interleaved(variants, trial):
                    modes = ("cold", "zygote") if args.zygote else ("cold",)
                    for mode in modes if trial % 2 == 0 else modes[::-1]:
                        label = f"{variant.label} {mode}" if args.zygote else variant.label
                        seconds = _time_one(variant, mode, layers, registry.host, base)
                        columns.setdefault(label, []).append(seconds)
                        progress(
                            f"trial {trial + 1}/{args.trials}: {label}: {seconds * 1000:.0f} ms"
                        )
    header = "all ready" if args.all_layers else "start -> ready"
    print(f"mount process {header} ({len(layers)} at once: {what}), load {_loadavg()}")
    for label, values in columns.items():
        print(
            f"{label}: median {statistics.median(values) * 1000:.0f} ms  "
            f"all {[round(v * 1000) for v in values]}"
        )
    return 0


def _time_one(
    variant: Variant, mode: str, layers: list[mounts.LayerFixture], host: str, base: Path
) -> float:
    if mode == "cold":
        return mounts.time_mounts(
            layers,
            host,
            "bench/pybig",
            base,
            lambda work, spec: mounts.start_cold(work, spec, variant.path),
        )
    zygote = mounts.CheckoutZygote(variant.path)
    try:
        time.sleep(0.5)  # as if started with the daemon, well before the first Prepare
        return mounts.time_mounts(layers, host, "bench/pybig", base, zygote.start)
    finally:
        zygote.close()


def cmd_decode_tree(args: argparse.Namespace) -> int:
    with scratch_dir() as base:
        variants = checkouts(args.variants, base)
        image = prepare_images(args.cache / "images", 0, {"pybig"}, progress)["pybig"]
        layers = mounts.layer_indexes(image, args.cache / "critical-path", progress)
        layer = max(layers, key=lambda layer: layer.entries)
        rows = []
        for variant in variants:
            progress(
                f"{variant.label}: {args.repeats} x decode + tree build, {layer.entries} entries"
            )
            result = subprocess.run(
                [sys.executable, str(DECODE_SCRIPT), str(layer.index_path), str(args.repeats)],
                capture_output=True,
                text=True,
                env=mounts.checkout_env(variant.path),
                cwd="/",
                check=False,
            )
            if result.returncode != 0:
                raise HarnessError(f"decode-tree in {variant.path}: {result.stderr.strip()}")
            times = json.loads(result.stdout)
            rows.append(
                [
                    variant.label,
                    *(
                        f"{min(times[key]) * 1000:.1f} / {statistics.median(times[key]) * 1000:.1f}"
                        for key in ("decode_s", "tree_s")
                    ),
                ]
            )
    print(f"index of {layer.entries} entries, {args.repeats} repeats, ms min / median")
    print(table(["variant", "decode_index", "LayerTree.from_index"], rows), end="")
    return 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.critical_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
        return value

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--trials", type=positive, default=1, help="trials (default 1)")
        sub.add_argument(
            "--cache",
            type=Path,
            default=DEFAULT_CACHE,
            help=f"image and index cache, shared with startup.py (default {DEFAULT_CACHE})",
        )

    trials = commands.add_parser("trials", help="cold-node pull + first run, A/B")
    trials.add_argument("out", type=Path, metavar="OUT", help="output directory")
    trials.add_argument("image", choices=IMAGES)
    trials.add_argument(
        "variants", type=parse_variant, nargs="+", metavar="VARIANT", help=VARIANT_HELP
    )
    common(trials)
    trials.add_argument("--trace", action="store_true", help="time ~55 functions (for steps)")
    trials.add_argument("--no-run", action="store_true", help="pull only, no first run")
    trials.set_defaults(handler=cmd_trials)

    for name, handler, text in (
        ("summary", cmd_summary, "whole-run figures per variant from OUT/trials.jsonl"),
        ("steps", cmd_steps, "per-step table of the --trace trials in OUT"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("out", type=Path, metavar="OUT", help="trials output dir or its jsonl")
        sub.set_defaults(handler=handler)

    mount = commands.add_parser("mount-startup", help="mount process start -> ready")
    mount.add_argument(
        "variants", type=parse_variant, nargs="+", metavar="VARIANT", help=VARIANT_HELP
    )
    common(mount)
    mount.add_argument(
        "--all-layers", action="store_true", help="all pybig layers at once (default: largest)"
    )
    mount.add_argument("--zygote", action="store_true", help="also fork by the daemon's zygote")
    mount.set_defaults(handler=cmd_mount_startup)

    decode = commands.add_parser(
        "decode-tree", help="index decode + tree build of the largest pybig layer, in process"
    )
    decode.add_argument(
        "variants", type=parse_variant, nargs="+", metavar="VARIANT", help=VARIANT_HELP
    )
    decode.add_argument("--repeats", type=positive, default=15, help="default 15")
    decode.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"image and index cache (default {DEFAULT_CACHE})",
    )
    decode.set_defaults(handler=cmd_decode_tree)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    needs_root = args.command in ("trials", "mount-startup")
    if needs_root and os.geteuid() != 0:
        print(f"critical_path.py {args.command}: needs root (mounts)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (HarnessError, TraceError) as exc:
        print(f"critical_path.py {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"critical_path.py {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"critical_path.py {args.command}: interrupted, cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
