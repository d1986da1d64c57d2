"""Index blob size with the gzip windows inline (format v1) vs in a windows blob (format v2).

For each gzip layer blob given (default: the gzip layers >= 10 MiB of the pybig test image in
/var/cache/lazysnap-test-images/pybig) and each span size, builds the layer's index once and
reports the v1 index blob size, the v2 index blob and windows blob sizes, and the time to
decode each index blob (CPU time of this thread, min of --trials runs: decode_index is what a
mount does with the blob before it can serve). Prints a markdown table and the command line.

    $PY -m bench.index_size [--span-size 1048576 ...]
        [--trials 7] [BLOB ...]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import command_line
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import decode_index, encode_index, encode_index_split

REPO = Path(__file__).resolve().parents[1]

GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
PYBIG_BLOBS = Path("/var/cache/lazysnap-test-images/pybig/blobs/sha256")
MIN_LAYER = 10 << 20


@dataclass(frozen=True)
class Row:
    layer: str
    layer_size: int
    span_size: int
    spans: int
    v1_size: int
    v2_size: int
    windows_size: int
    v1_decode_s: float
    v2_decode_s: float


def default_blobs() -> list[Path]:
    """The pybig image's gzip layers of at least 10 MiB, largest first."""
    found = [
        path
        for path in PYBIG_BLOBS.iterdir()
        if path.stat().st_size >= MIN_LAYER and path.read_bytes()[:2] == b"\x1f\x8b"
    ]
    return sorted(found, key=lambda p: -p.stat().st_size)


def min_cpu_seconds(action: Callable[[], object], trials: int) -> float:
    timings = []
    for _ in range(trials):
        gc.collect()
        started = time.thread_time()
        action()
        timings.append(time.thread_time() - started)
    return min(timings)


def measure(blob: Path, span_size: int, trials: int) -> Row:
    with blob.open("rb") as stream:
        index = build_layer_index(stream, media_type=GZIP_MT, span_size=span_size)
    v1 = encode_index(index)
    v2, windows = encode_index_split(index)
    return Row(
        layer=blob.name[:12],
        layer_size=blob.stat().st_size,
        span_size=span_size,
        spans=len(index.spans),
        v1_size=len(v1),
        v2_size=len(v2),
        windows_size=len(windows),
        v1_decode_s=min_cpu_seconds(lambda: decode_index(v1), trials),
        v2_decode_s=min_cpu_seconds(lambda: decode_index(v2), trials),
    )


def _kib(size: int) -> str:
    return f"{size / 1024:,.0f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| layer | layer MiB | span | spans | v1 index KiB | v2 index KiB | windows KiB "
        "| v2 index / v1 | v1 decode ms | v2 decode ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for span_size in sorted({row.span_size for row in rows}, reverse=True):
        group = [row for row in rows if row.span_size == span_size]
        total = Row(
            "all",
            *(
                sum(getattr(row, name) for row in group)
                for name in (
                    "layer_size",
                    "span_size",
                    "spans",
                    "v1_size",
                    "v2_size",
                    "windows_size",
                    "v1_decode_s",
                    "v2_decode_s",
                )
            ),
        )
        for row in [*group, total]:
            span = f"{span_size >> 10} KiB"
            lines.append(
                f"| {row.layer} | {row.layer_size / 2**20:.1f} | {span} | {row.spans} "
                f"| {_kib(row.v1_size)} | {_kib(row.v2_size)} | {_kib(row.windows_size)} "
                f"| {row.v2_size / row.v1_size:.3f} | {row.v1_decode_s * 1000:.1f} "
                f"| {row.v2_decode_s * 1000:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_size", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "blobs", nargs="*", type=Path, help="gzip layer blobs (default: pybig's big layers)"
    )
    parser.add_argument(
        "--span-size",
        type=int,
        action="append",
        help="span size in bytes, repeatable (default: 1048576 and 262144)",
    )
    parser.add_argument("--trials", type=int, default=7, help="decode runs per blob (min kept)")
    args = parser.parse_args(argv)
    blobs: list[Path] = args.blobs or default_blobs()
    if not blobs:
        parser.error(f"no gzip layer blobs given and none >= 10 MiB in {PYBIG_BLOBS}")
    for blob in blobs:
        if not blob.is_file():
            parser.error(f"{blob}: not a file")
    span_sizes: list[int] = args.span_size or [1 << 20, 256 << 10]
    rows = [measure(blob, span, args.trials) for span in span_sizes for blob in blobs]
    print(table(rows))
    print()
    print("command: " + command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
