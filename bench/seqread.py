"""Cold sequential read of one big file through a lazy mount, read-ahead off vs on.

What it measures: the MB/s of reading one ~200 MB file (concatenated /usr/lib files, gzip, the
seqread image of bench/startup_images.py) front to back in 1 MiB reads through a
lazysnap mount process whose span cache and the page cache were just emptied, with the blob
served by docker-registry on loopback (harness). Each trial mounts the layer once per
configuration (read-ahead off = `read_ahead_spans` 0, on = the reader's default or
--read-ahead-spans), in an order that rotates between trials, and measures single-core inflate
(zlib-ng when installed) of the same blob, so the ratio "read MB/s / inflate MB/s" compares
figures of the same moment. Prints one line per read and a summary (medians) on stdout;
progress goes to stderr. Needs root (drop_caches, FUSE with allow_other).

    sudo $PY -m bench.seqread --trials 3
    sudo $PY -m bench.seqread --trials 5 --read-ahead-spans 16 --json out.json

Everything it starts (registry, mount processes, mounts, temp dirs) is removed on exit, error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from bench.critical_path_mounts import MountRun, start_cold, stop, wait_ready, work_dir
from bench.startup_images import SEQREAD_FILE, inflate_rate, prepare_images
from harness.images import BuiltImage, LayerInfo, push
from harness.procs import HarnessError
from harness.registry import Registry, start_registry
from snapshotter.fs.reader import DEFAULT_READ_AHEAD_SPANS

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CACHE = Path("/var/cache/lazysnap-bench/images")  # shared with startup.py's images
DEFAULT_SIZE = 200_000_000
READ_SIZE = 1 << 20
REPOSITORY = "bench/seqread-readahead"
OFF, ON = "read-ahead off", "read-ahead on"


def progress(message: str) -> None:
    print(f"[bench.seqread] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Trial:
    """One timed read of the whole file through a fresh mount."""

    trial: int
    mode: str
    read_ahead_spans: int
    bytes_read: int
    seconds: float
    inflate_mb_s: float  # single-core inflate of the same blob, this trial
    range_requests: int  # blob GETs the registry answered during the read
    bytes_fetched: int  # blob bytes it sent
    readahead_spans: int  # the mount's counter (-1 if its state file was not readable)

    @property
    def mb_s(self) -> float:
        return self.bytes_read / self.seconds / 1e6


@dataclass(frozen=True)
class ModeSummary:
    mode: str
    trials: int
    mb_s_median: float
    mb_s_min: float
    mb_s_max: float
    inflate_mb_s_median: float
    ratio_median: float  # of each trial's read MB/s to its own inflate MB/s
    range_requests_median: float
    mb_fetched_median: float


def summarize(trials: Sequence[Trial]) -> list[ModeSummary]:
    """Medians per mode, in the order modes first appear."""
    modes = list(dict.fromkeys(t.mode for t in trials))
    out = []
    for mode in modes:
        mine = [t for t in trials if t.mode == mode]
        rates = [t.mb_s for t in mine]
        out.append(
            ModeSummary(
                mode=mode,
                trials=len(mine),
                mb_s_median=statistics.median(rates),
                mb_s_min=min(rates),
                mb_s_max=max(rates),
                inflate_mb_s_median=statistics.median(t.inflate_mb_s for t in mine),
                ratio_median=statistics.median(t.mb_s / t.inflate_mb_s for t in mine),
                range_requests_median=statistics.median(t.range_requests for t in mine),
                mb_fetched_median=statistics.median(t.bytes_fetched / 1e6 for t in mine),
            )
        )
    return out


def trial_order(trial: int, modes: Sequence[str]) -> list[str]:
    """The modes rotated by the trial number, so neither always runs first."""
    shift = trial % len(modes)
    return [*modes[shift:], *modes[:shift]]


def report(summaries: Sequence[ModeSummary]) -> str:
    lines = [
        "| configuration | trials | cold read MB/s median [min-max] | inflate MB/s | "
        "read / inflate | range requests | MB fetched |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.mode} | {s.trials} | {s.mb_s_median:.0f} [{s.mb_s_min:.0f}-{s.mb_s_max:.0f}] | "
            f"{s.inflate_mb_s_median:.0f} | {s.ratio_median:.0%} | "
            f"{s.range_requests_median:.0f} | {s.mb_fetched_median:.1f} |"
        )
    return "\n".join(lines)


# -- setup ------------------------------------------------------------------------------------


def data_layer(image: BuiltImage) -> LayerInfo:
    return max(image.layers, key=lambda layer: layer.size)


def layer_index(image: BuiltImage, layer: LayerInfo, cache: Path, span_size: int | None) -> Path:
    """The layer's encoded index (default span size unless given), cached across runs."""
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import encode_index

    hex_digest = layer.digest.split(":", 1)[1]
    path = cache / f"seqread-index-{hex_digest[:16]}-{span_size or 'default'}.bin"
    if path.exists():
        return path
    progress(f"setup: indexing the {layer.size / 1e6:.0f} MB layer (not timed)")
    from snapshotter.index.model import DEFAULT_SPAN_SIZE

    with open(image.layout / "blobs" / "sha256" / hex_digest, "rb") as blob:
        index = build_layer_index(
            blob,
            media_type=layer.media_type,
            expected_digest=layer.digest,
            span_size=span_size or DEFAULT_SPAN_SIZE,
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_index(index))
    tmp.rename(path)
    return path


def write_spec(
    work: Path, index_path: Path, layer: LayerInfo, registry: Registry, read_ahead_spans: int
) -> Path:
    (work / "mnt").mkdir(parents=True)
    spec = {
        "mountpoint": str(work / "mnt"),
        "index_path": str(index_path),
        "blob": {
            "kind": "registry",
            "location": f"{registry.host}/{REPOSITORY}",
            "access": {"plain_http": [registry.host]},
            "digest": layer.digest,
            "size": layer.size,
        },
        "cache_dir": str(work / "cache"),  # a fresh, empty span cache
        "cache_max_bytes": 4 << 30,
        "prefetch": False,
        "background": False,
        "state_interval": 0.2,
        "read_ahead_spans": read_ahead_spans,
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_read(path: Path) -> tuple[int, float]:
    """Bytes and seconds of reading path front to back in READ_SIZE reads."""
    buffer = bytearray(READ_SIZE)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        started = time.perf_counter()
        while True:
            got = handle.readinto(buffer)
            if not got:
                break
            total += got
        return total, time.perf_counter() - started


def one_read(
    trial: int,
    mode: str,
    spans: int,
    scratch: Path,
    image: BuiltImage,
    index_path: Path,
    registry: Registry,
) -> Trial:
    layer = data_layer(image)
    with work_dir(scratch, "seqread-") as work:
        spec = write_spec(work, index_path, layer, registry, spans)
        inflater, inflate = inflate_rate(image)
        drop_caches()
        run: MountRun = start_cold(work, spec, REPO)
        try:
            ready = wait_ready(run)
            if ready != "ready":
                raise HarnessError(f"mount did not start: {ready}; log {work / 'mount.log'}")
            log_offset = registry.log_offset()
            size, seconds = timed_read(run.mountpoint / SEQREAD_FILE.lstrip("/"))
            time.sleep(0.5)  # the state file is rewritten every 0.2 s
            state = read_state_counters(run.mountpoint)
        finally:
            stop(run)
        fetches = registry.blob_fetches(since=log_offset).get(layer.digest)
    result = Trial(
        trial=trial,
        mode=mode,
        read_ahead_spans=spans,
        bytes_read=size,
        seconds=seconds,
        inflate_mb_s=inflate,
        range_requests=fetches.requests if fetches else 0,
        bytes_fetched=fetches.bytes if fetches else 0,
        readahead_spans=state.get("readahead_spans", -1),
    )
    print(
        f"trial {trial} {mode:15} {result.mb_s:7.0f} MB/s  ({size / 1e6:.0f} MB in "
        f"{seconds:.2f} s; {inflater} inflate {inflate:.0f} MB/s = {result.mb_s / inflate:.0%}; "
        f"{result.range_requests} requests, {result.bytes_fetched / 1e6:.1f} MB fetched, "
        f"readahead_spans {result.readahead_spans})",
        flush=True,
    )
    return result


def read_state_counters(mountpoint: Path) -> dict[str, int]:
    from snapshotter.sidecars import read_state

    state = read_state(str(mountpoint)) or {}
    counters = state.get("counters")
    return counters if isinstance(counters, dict) else {}


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.seqread",
        description="Cold sequential read through a lazy mount: read-ahead off vs on "
        "(interleaved trials, medians, ratio to same-run single-core inflate).",
    )
    parser.add_argument("--trials", type=int, default=3, help="trials per configuration (3)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"file size in bytes ({DEFAULT_SIZE})"
    )
    parser.add_argument(
        "--read-ahead-spans",
        type=int,
        default=DEFAULT_READ_AHEAD_SPANS,
        help=f"largest read-ahead window of the 'on' configuration ({DEFAULT_READ_AHEAD_SPANS})",
    )
    parser.add_argument(
        "--span-size", type=int, help="index span size in bytes (default: the indexer's)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the image and its index are cached across runs ({DEFAULT_CACHE})",
    )
    parser.add_argument("--json", type=Path, help="also write every trial and the summary here")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.read_ahead_spans < 1 or args.size < READ_SIZE:
        parser.error("--trials and --read-ahead-spans must be >= 1, --size >= 1 MiB")
    return args


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.seqread: error: needs root (drop_caches, FUSE mounts)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_signal)
    modes = {OFF: 0, ON: args.read_ahead_spans}
    trials: list[Trial] = []
    try:
        with contextlib.ExitStack() as stack:
            scratch = stack.enter_context(work_dir(Path(tempfile.gettempdir()), "seqread-"))
            image = prepare_images(args.cache, args.size, {"seqread"}, progress)["seqread"]
            index_path = layer_index(image, data_layer(image), args.cache, args.span_size)
            progress("setup: starting docker-registry and pushing the image")
            registry = start_registry(scratch / "registry")
            stack.callback(registry.stop)
            push(image, registry.host, REPOSITORY)
            for trial in range(1, args.trials + 1):
                for mode in trial_order(trial, list(modes)):
                    progress(f"trial {trial}/{args.trials}: {mode}")
                    trials.append(
                        one_read(trial, mode, modes[mode], scratch, image, index_path, registry)
                    )
    except KeyboardInterrupt:
        progress("interrupted: cleaned up")
        return 130
    except HarnessError as exc:
        print(f"bench.seqread: error: {exc}", file=sys.stderr)
        return 1
    summaries = summarize(trials)
    print()
    print(report(summaries))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "trials": [asdict(t) | {"mb_s": t.mb_s} for t in trials],
                    "summary": [asdict(s) for s in summaries],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
