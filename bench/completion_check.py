"""Cost of the completion check (snapshotter/lazylayers/completion.py), and what it does to reads.

For each gzip layer of the pybig test image (an OCI layout, default
/var/cache/lazysnap-test-images/pybig; its config gives the diffIDs), the layer's index is built
and every span inflated into a fresh span cache, as background fetch leaves it. Then, per trial:

- the check helper exactly as the daemon runs it (`python -m snapshotter.lazylayers.completion
  --spec`, here without nice so its CPU time is what it costs), timed by its rusage: CPU
  seconds (user + system) per GB of uncompressed tar checked, and wall seconds;
- a foreground read workload beside the check run at the daemon's priority (nice 19, ionice
  best-effort 7), unpaced and paced as the daemon runs it: a single thread reading every span
  of the cache in 128 KiB pieces through SpanCache.read, as a mount process serves cache hits
  (a fresh SpanCache per pass, so each span file is hashed once again, as in a new mount
  process). The check is stopped (SIGSTOP) and continued every 3 passes, so passes alone and
  beside it interleave at the same machine load; the slowdown compares their medians.

Prints a markdown table and the command line; temporary files go to a private directory that is
removed at the end.

    $PY -m bench.completion_check [--trials 3]
        [--layout DIR] [--span-size 1048576]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import command_line
from snapshotter.fs.background import DEFAULT_RATE_BYTES
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.low_priority import HELPER_PREFIX as NICE
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import encode_index
from snapshotter.index.model import DEFAULT_SPAN_SIZE, LayerIndex
from snapshotter.index.spans import inflate_span

REPO = Path(__file__).resolve().parents[1]

PYBIG = Path("/var/cache/lazysnap-test-images/pybig")
READ_PIECE = 128 << 10
PASSES_PER_WINDOW = 3


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    uncompressed: int
    spec: Path  # unpaced: what the check costs
    paced_spec: Path  # as the daemon runs it: paced at [fetch] background_rate_bytes
    index: LayerIndex


def image_layers(layout: Path) -> list[tuple[Path, str, str, str]]:
    """(blob path, digest, media type, diffID) of the image tagged latest."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    return [
        (blobs / layer["digest"].split(":")[1], layer["digest"], layer["mediaType"], diff_id)
        for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)
    ]


def prepare(blob: Path, digest: str, media_type: str, diff_id: str, work: Path, span: int) -> Layer:
    """Index the layer and fill the cache with every span, as background fetch does."""
    with blob.open("rb") as stream:
        index = build_layer_index(stream, media_type=media_type, span_size=span)
    cache = SpanCache(work / "cache", 1 << 40)
    with blob.open("rb") as data:
        for number, s in enumerate(index.spans):
            data.seek(s.compressed_start)
            inflated = inflate_span(index, number, data.read(s.compressed_size))
            cache.put(index.layer_digest, number, inflated, s.uncompressed_digest)
    hex_digest = digest.split(":")[1]
    index_path = work / f"{hex_digest}.index"
    index_path.write_bytes(encode_index(index))
    spec = {
        "mountpoint": str(work / hex_digest / "fs"),
        "index_path": str(index_path),
        "blob": {"kind": "file", "location": str(blob), "digest": digest},
        "cache_dir": str(work / "cache"),
        "cache_max_bytes": 1 << 40,
        "diff_id": diff_id,
    }
    spec_path = work / f"{hex_digest}.spec.json"
    spec_path.write_text(json.dumps({**spec, "background_rate_bytes": 1 << 40}))
    paced_path = work / f"{hex_digest}.paced.json"
    paced_path.write_text(json.dumps({**spec, "background_rate_bytes": DEFAULT_RATE_BYTES}))
    return Layer(digest, blob.stat().st_size, index.uncompressed_size, spec_path, paced_path, index)


def start_check(layer: Layer, niced: bool, paced: bool = False) -> subprocess.Popen[bytes]:
    spec = layer.paced_spec if paced else layer.spec
    command = [sys.executable, "-m", "snapshotter.lazylayers.completion", "--spec", str(spec)]
    return subprocess.Popen(
        [*NICE, *command] if niced else command,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_check(layer: Layer) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one check, which must pass."""
    started = time.monotonic()
    child = start_check(layer, niced=False)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - started
    report = json.loads(output.decode().strip().splitlines()[-1])
    if status != 0 or report["result"] != "passed":
        raise SystemExit(f"check of {layer.digest} did not pass: {report}")
    return usage.ru_utime + usage.ru_stime, wall


def foreground_pass(work: Path, layer: Layer) -> float:
    """MB/s of one pass of cache-hit reads over every span of layer (fresh SpanCache)."""
    cache = SpanCache(work / "cache", 1 << 40)
    started = time.monotonic()
    total = 0
    for number, span in enumerate(layer.index.spans):
        size = span.uncompressed_size
        for offset in range(0, size, READ_PIECE):
            length = min(READ_PIECE, size - offset)
            data = cache.read(layer.digest, number, offset, length, size, span.uncompressed_digest)
            assert data is not None
            total += length
    return total / 1e6 / (time.monotonic() - started)


def foreground(
    work: Path, reader_layer: Layer, checked: Layer, trials: int, paced: bool
) -> tuple[float, float]:
    """(median MB/s of read passes alone, median MB/s of passes beside the check of `checked`
    at the daemon's priority). Alone and beside interleave within each check's run: the check
    is stopped (SIGSTOP) for every other group of passes, so both see the same machine load."""
    alone: list[float] = []
    beside: list[float] = []
    for _ in range(trials):
        child = start_check(checked, niced=True, paced=paced)
        running = True
        while child.poll() is None:
            for _ in range(PASSES_PER_WINDOW):
                (beside if running else alone).append(foreground_pass(work, reader_layer))
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGCONT if not running else signal.SIGSTOP)
            running = not running
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
        child.wait()
    return statistics.median(alone), statistics.median(beside)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.completion_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layout", type=Path, default=PYBIG)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lzs-bench-check-"))
    try:
        layers = []
        for blob, digest, media_type, diff_id in image_layers(args.layout):
            print(f"indexing and caching {digest[:19]} ...", file=sys.stderr)
            layers.append(prepare(blob, digest, media_type, diff_id, work, args.span_size))
        print("| layer | compressed | uncompressed | check CPU s (median) | CPU s/GB | wall s |")
        print("|---|---:|---:|---:|---:|---:|")
        cpu_total = bytes_total = 0.0
        for layer in layers:
            runs = [run_check(layer) for _ in range(args.trials)]
            cpu = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            cpu_total += cpu
            bytes_total += layer.uncompressed
            print(
                f"| {layer.digest[7:19]} | {layer.size / 1e6:.1f} MB | "
                f"{layer.uncompressed / 1e6:.1f} MB | {cpu:.2f} | "
                f"{cpu / (layer.uncompressed / 1e9):.2f} | {wall:.2f} |"
            )
        print(f"\nall layers: {cpu_total / (bytes_total / 1e9):.2f} CPU s per GB uncompressed")
        biggest = max(layers, key=lambda x: x.uncompressed)
        smaller = min(layers, key=lambda x: x.uncompressed)
        for paced in (False, True):
            alone, beside = foreground(work, smaller, biggest, args.trials, paced)
            how = f"paced at {DEFAULT_RATE_BYTES >> 20} MiB/s" if paced else "unpaced"
            print(
                f"foreground cache-hit reads of {smaller.digest[7:19]}: {alone:.0f} MB/s alone, "
                f"{beside:.0f} MB/s beside the check of {biggest.digest[7:19]} (nice 19, "
                f"{how}): {100 * (beside / alone - 1):+.1f} %"
            )
        print(f"\ncommand: {command_line()}; {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
