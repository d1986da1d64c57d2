#!/usr/bin/env python3
"""Index build speed beside `gzip -dc` (and `zstd -dc`) on the same layer, same run.

Builds a layer from a directory of this machine (default /usr/lib/python3.11: real Debian
content), compresses it with gzip -6, pigz and zstd frames, then times, interleaved, for each
trial: `gzip -dc` of the blob, build_layer_index over a non-seekable stream of it, and
decode_index of the result. Prints a markdown table (median of the trials, min-max) and the
command line. Temporary files go to a private directory that is removed at the end.

    /opt/lazysnap-venv/bin/python scripts/bench/bench_index_build.py [--source DIR] [--trials 5]
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from snapshotter.index.build import build_layer_index  # noqa: E402
from snapshotter.index.codec import decode_index, encode_index  # noqa: E402
from snapshotter.index.model import DEFAULT_SPAN_SIZE  # noqa: E402

GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_MT = "application/vnd.oci.image.layer.v1.tar+zstd"


class BodyStream:
    """Like an HTTP response body: read() only, no seek."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb", buffering=0)

    def read(self, n: int = -1) -> bytes:
        return self._file.read(n)

    def close(self) -> None:
        self._file.close()


@dataclass
class Row:
    layer: str
    what: str
    seconds: list[float]
    mb: float  # uncompressed MB processed per run

    def line(self) -> str:
        med = statistics.median(self.seconds)
        rates = sorted(self.mb / s for s in self.seconds)
        return (
            f"| {self.layer} | {self.what} | {med * 1000:.0f} | "
            f"{self.mb / med:.0f} ({rates[0]:.0f}-{rates[-1]:.0f}) |"
        )


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def build(path: Path, media_type: str, span_size: int) -> bytes:
    stream = BodyStream(path)
    try:
        index = build_layer_index(stream, media_type=media_type, span_size=span_size)  # type: ignore[arg-type]
    finally:
        stream.close()
    return encode_index(index)


def decompress_cli(tool: str, path: Path) -> None:
    subprocess.run([tool, "-dc", str(path)], stdout=subprocess.DEVNULL, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="/usr/lib/python3.11", help="directory to tar")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--span-size", type=int, default=DEFAULT_SPAN_SIZE)
    args = parser.parse_args()
    if args.trials < 3:
        parser.error("--trials must be >= 3 (the table shows medians)")
    work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-index-"))
    try:
        tar = work / "layer.tar"
        source = Path(args.source).resolve()
        subprocess.run(
            ["tar", "-C", "/", "--sort=name", "-cf", str(tar), str(source.relative_to("/"))],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        raw = tar.read_bytes()
        mb = len(raw) / 1e6
        layers = {
            "gzip -6": work / "l.gz",
            "pigz": work / "l.pigz.gz",
            "zstd 4 MiB frames": work / "l.zst",
        }
        with layers["gzip -6"].open("wb") as out:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], stdout=out, check=True)
        with layers["pigz"].open("wb") as out:
            subprocess.run(["pigz", "-n", "-c", str(tar)], stdout=out, check=True)
        cctx = zstandard.ZstdCompressor(level=3)
        frames = io.BytesIO()
        for i in range(0, len(raw), 4 << 20):
            frames.write(cctx.compress(raw[i : i + (4 << 20)]))
        layers["zstd 4 MiB frames"].write_bytes(frames.getvalue())
        rows: list[Row] = []
        for name, path in layers.items():
            is_zstd = name.startswith("zstd")
            media_type = ZSTD_MT if is_zstd else GZIP_MT
            tool = "zstd" if is_zstd and shutil.which("zstd") else "gzip"
            cli = Row(name, f"`{tool} -dc` (reference)", [], mb)
            builder = Row(name, "build_layer_index", [], mb)
            loader = Row(name, "decode_index (load)", [], mb)
            encoded = b""
            for _ in range(args.trials):  # interleaved so load changes hit all rows alike
                if not is_zstd or tool == "zstd":
                    cli.seconds.append(timed(lambda p=path, t=tool: decompress_cli(t, p)))
                started = time.perf_counter()
                encoded = build(path, media_type, args.span_size)
                builder.seconds.append(time.perf_counter() - started)
                loader.seconds.append(timed(lambda e=encoded: decode_index(e)))
            index = decode_index(encoded)
            print(
                f"{name}: {path.stat().st_size / 1e6:.1f} MB compressed, {mb:.1f} MB tar, "
                f"{len(index.entries)} entries, {len(index.spans)} spans, "
                f"index {len(encoded) / 1e3:.0f} kB",
                file=sys.stderr,
            )
            rows += [r for r in (cli, builder, loader) if r.seconds]
        print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`  ")
        print(f"Layer: tar of {source} ({mb:.1f} MB), span size {args.span_size >> 20} MiB, "
              f"{args.trials} trials, median (min-max of MB/s).\n")  # fmt: skip
        print("| layer | step | median ms | MB/s of tar (range) |")
        print("|---|---|---|---|")
        for row in rows:
            print(row.line())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
