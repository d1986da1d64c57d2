"""Index build speed beside `gzip -dc` (and `zstd -dc`) on the same layer, same run.

Builds a layer from a directory of this machine (default /usr/lib/python3.11: real Debian
content), compresses it with gzip -6, pigz and zstd frames, then times, interleaved, for each
trial: `gzip -dc` of the blob, build_layer_index over a non-seekable stream of it (timed with
encode_index_split, what `lazysnap index build` writes), and decode_index of the result. With
--baseline REV the builder of that git revision is timed too (with --file-cut-min also its
file-aware build), in the same trials, so a before/after comparison sees the same machine
load. Prints a markdown table (median of the trials, min-max, speed relative to the CLI) and
the command line.
Temporary files go to a private directory that is removed at the end.

    $PY -m bench.index_build [--source DIR] [--trials 5]
        [--baseline HEAD~2] [--system-zlib]

Each builder runs in its own long-lived worker process (this module with --worker TREE), which
imports `snapshotter` from TREE (this checkout, or `git archive` of the baseline revision) and
reports the time it measured itself, so process start and imports are not counted.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import command_line

REPO = Path(__file__).resolve().parents[1]
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


def worker(tree: str, inflate_library: str | None, file_cut_min: int | None) -> int:
    """Serve build requests (JSON lines on stdin) with the builder found in `tree`."""
    sys.path.insert(0, tree)
    from snapshotter.index import codec
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import decode_index

    library = None
    if inflate_library:  # pin the gzip builder's C library (this checkout's builder only)
        from snapshotter.index.block_inflate import load_inflate_library

        library = load_inflate_library(inflate_library)

    loaded = Path(sys.modules["snapshotter"].__file__ or "").resolve()
    if not loaded.is_relative_to(Path(tree).resolve()):
        print(f"worker imported snapshotter from {loaded}, not {tree}", file=sys.stderr)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        stream = BodyStream(Path(request["path"]))
        try:
            started = time.perf_counter()
            media_type, span_size = request["media_type"], request["span_size"]
            # only the parameters asked for: a baseline's builder may predate them
            options: dict[str, Any] = {} if library is None else {"inflate_library": library}
            if file_cut_min is not None:
                options["file_cut_min"] = file_cut_min
            index = build_layer_index(stream, media_type=media_type, span_size=span_size, **options)
            # what `lazysnap index build` writes: the windows in a windows blob, one zstd frame
            # each (a tree from before format 2 has only encode_index)
            split = getattr(codec, "encode_index_split", None)
            encoded, windows = split(index) if split else (codec.encode_index(index), b"")
            built = time.perf_counter() - started
        finally:
            stream.close()
        started = time.perf_counter()
        decode_index(encoded)
        decoded = time.perf_counter() - started
        reply = {"build": built, "decode": decoded, "spans": len(index.spans)}
        reply |= {"entries": len(index.entries), "index_bytes": len(encoded)}
        reply |= {"windows_bytes": len(windows)}
        print(json.dumps(reply), flush=True)
    return 0


class Worker:
    """One builder (a source tree) in its own process."""

    def __init__(
        self, tree: Path, inflate_library: str | None = None, file_cut_min: int | None = None
    ) -> None:
        pinned = ["--inflate-library", inflate_library] if inflate_library else []
        if file_cut_min is not None:
            pinned += ["--file-cut-min", str(file_cut_min)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.index_build", "--worker", str(tree), *pinned],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,  # `bench` from here; the worker puts TREE first for `snapshotter`
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        self._expect("ready")

    def _expect(self, key: str) -> dict[str, float]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker exited with {self.process.wait()}")
        reply: dict[str, float] = json.loads(line)
        if key not in reply:
            raise SystemExit(f"benchmark worker answered {line!r}")
        return reply

    def build(self, path: Path, media_type: str, span_size: int) -> dict[str, float]:
        assert self.process.stdin is not None
        request = {"path": str(path), "media_type": media_type, "span_size": span_size}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._expect("build")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Row:
    layer: str
    what: str
    seconds: list[float]
    mb: float  # uncompressed MB processed per run

    def rate(self) -> float:
        return self.mb / statistics.median(self.seconds)

    def line(self, reference: Row | None) -> str:
        med = statistics.median(self.seconds)
        rates = sorted(self.mb / s for s in self.seconds)
        relative = f"{self.rate() / reference.rate():.2f}x" if reference else ""
        return (
            f"| {self.layer} | {self.what} | {med * 1000:.0f} | "
            f"{self.rate():.0f} ({rates[0]:.0f}-{rates[-1]:.0f}) | {relative} |"
        )


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def decompress_cli(tool: str, path: Path) -> None:
    subprocess.run([tool, "-dc", str(path)], stdout=subprocess.DEVNULL, check=True)


def export_revision(revision: str, into: Path) -> None:
    """`git archive` of the revision's snapshotter package into `into`."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "snapshotter"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"cannot export revision {revision!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def make_layers(source: Path, work: Path) -> tuple[dict[str, Path], float]:
    import zstandard

    tar = work / "layer.tar"
    subprocess.run(
        ["tar", "-C", "/", "--sort=name", "-cf", str(tar), str(source.relative_to("/"))],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    raw = tar.read_bytes()
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
    return layers, len(raw) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", default="/usr/lib/python3.11", help="directory to tar")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--span-size", type=int, default=4 << 20)
    parser.add_argument("--baseline", metavar="REV", help="also time the builder of this git rev")
    parser.add_argument(
        "--system-zlib",
        action="store_true",
        help="also time this checkout's gzip builder on the system zlib (its fallback library)",
    )
    parser.add_argument(
        "--file-cut-min",
        type=int,
        default=None,
        help="also time this checkout's builder with this file cut minimum (file-aware spans)",
    )
    parser.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--inflate-library", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.inflate_library, args.file_cut_min)
    if args.trials < 3:
        parser.error("--trials must be >= 3 (the table shows medians)")
    source = Path(args.source).resolve()
    if not source.is_dir():
        parser.error(f"--source {source} is not a directory")
    work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-index-"))
    workers: dict[str, Worker] = {}
    try:
        workers["build_layer_index"] = Worker(REPO)
        if args.system_zlib:
            workers["build_layer_index, system zlib"] = Worker(REPO, "zlib")
        if args.file_cut_min is not None:
            label = f"build_layer_index, file_cut_min {args.file_cut_min}"
            workers[label] = Worker(REPO, file_cut_min=args.file_cut_min)
        if args.baseline:
            export_revision(args.baseline, work / "baseline")
            workers[f"build_layer_index @ {args.baseline}"] = Worker(work / "baseline")
            if args.file_cut_min is not None:  # the baseline's builder must know the option
                label = f"build_layer_index @ {args.baseline}, file_cut_min {args.file_cut_min}"
                workers[label] = Worker(work / "baseline", file_cut_min=args.file_cut_min)
        layers, mb = make_layers(source, work)
        rows: list[tuple[Row | None, Row]] = []
        for name, path in layers.items():
            is_zstd = name.startswith("zstd")
            media_type = ZSTD_MT if is_zstd else GZIP_MT
            tool = "zstd" if is_zstd and shutil.which("zstd") else "gzip"
            cli = Row(name, f"`{tool} -dc` (reference)", [], mb)
            builders = {label: Row(name, label, [], mb) for label in workers}
            loader = Row(name, "decode_index (load)", [], mb)
            last: dict[str, float] = {}
            for _ in range(args.trials):  # interleaved so load changes hit all rows alike
                if not is_zstd or tool == "zstd":
                    cli.seconds.append(timed(functools.partial(decompress_cli, tool, path)))
                for label, process in workers.items():
                    last = process.build(path, media_type, args.span_size)
                    builders[label].seconds.append(last["build"])
                    if label == "build_layer_index":
                        loader.seconds.append(last["decode"])
            print(
                f"{name}: {path.stat().st_size / 1e6:.1f} MB compressed, {mb:.1f} MB tar, "
                f"{last['entries']:.0f} entries, {last['spans']:.0f} spans, "
                f"index {last['index_bytes'] / 1e3:.0f} kB + windows "
                f"{last.get('windows_bytes', 0) / 1e3:.0f} kB (of the last builder)",
                file=sys.stderr,
            )
            reference = cli if cli.seconds else None
            if reference:
                rows.append((None, cli))
            rows += [(reference, row) for row in builders.values()]
            rows.append((None, loader))
        print(f"Command: `{command_line()}`  ")
        print(f"Layer: tar of {source} ({mb:.1f} MB), span size {args.span_size >> 20} MiB, "
              f"{args.trials} trials, median (min-max of MB/s), load average at the end "
              f"{os.getloadavg()[0]:.1f}.\n")  # fmt: skip
        print("| layer | step | median ms | MB/s of tar (range) | builder speed / CLI speed |")
        print("|---|---|---|---|---|")
        for reference, row in rows:
            print(row.line(reference))
    finally:
        for process in workers.values():
            process.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
