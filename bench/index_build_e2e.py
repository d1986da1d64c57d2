"""`lazysnap index build` end to end beside `gzip -dc` of the same layer blobs, same run.

Issue 15's figure: the whole command (process start, registry stream in, indexes and artifact
pushed out) against decompressing every layer it must index. A docker-registry on loopback
(harness) holds the image (default: the cached pybig test image, scripts/build-test-images.sh;
--source DIR: a one-layer image of a tar of DIR); each trial times, interleaved in rotating
order, `gzip -dc` (`zstd -dc` for zstd layers) of all those blobs from disk, one process, and
`lazysnap index build` of the image from scratch: a fresh repository per run (its blobs mounted
from the pushed one), so neither its namespace's index cache nor an artifact already there is
hit, and --no-shared-cache. With --baseline REV the build of that git revision runs too, in the
same trials (`git archive` of its snapshotter package, run with the same Python), so a
before/after comparison sees the same machine load. Each tree's bytecode is compiled before the
trials, as an installed package's is: with PYTHONDONTWRITEBYTECODE set (as in this environment)
every build process, its workers included, would otherwise compile the tree's modules again
(~0.1 s of CPU per build that no user pays). Prints a markdown table (median of the
trials, min-max, speed relative to `gzip -dc`, and the CPU time each command and the registry
spent: on a busy machine that, more than the wall time, decides the ratio) and the command line.

    $PY -m bench.index_build_e2e [--trials 5] [--baseline REV] [--source DIR]
        [--build-arg=--jobs=1]... [--quick] [--stages] [--perf]

Where the CPU goes: --stages times each stage of the builder in this process over the same
blobs from disk (time.process_time around it: compressed sha256, inflate alone, the span
builder, the tar parser, the whole builder, the index encoding, and the index decoding the static
profile pays), beside `gzip -dc`'s user+sys; --perf runs one build under `perf record` (all its
processes and threads) and splits its CPU seconds by process/thread and by library (zlib-ng
inflate, libcrypto sha256, the interpreter, zstd, the kernel: pipes, sockets, page faults).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import command_line

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGES = Path(os.environ.get("LAZYSNAP_TEST_IMAGES", "/var/cache/lazysnap-test-images"))
QUICK_SOURCE = "/usr/lib/python3.11/email"
GZIP_SUFFIXES = ("gzip", "gz")


@dataclass
class Row:
    what: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # user + sys of the command and its children
    registry_cpu: list[float] = field(default_factory=list)  # the registry's, meanwhile
    last_output: str = ""

    def line(self, reference: Row, tar_mb: float) -> str:
        median = statistics.median(self.seconds)
        ratio = statistics.median(reference.seconds) / median
        return (
            f"| {self.what} | {median:.2f} | {min(self.seconds):.2f}-{max(self.seconds):.2f} | "
            f"{tar_mb / median:.0f} | {ratio:.2f}x | {statistics.median(self.cpu):.2f} | "
            f"{statistics.median(self.registry_cpu):.2f} |"
        )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """user + sys seconds of a running process (the registry)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Image:
    layout: Path
    tag: str
    manifest: bytes
    manifest_media_type: str
    blobs: tuple[tuple[str, Path], ...]  # config and layers: digest, file in the layout
    layers: tuple[tuple[str, int, str, Path], ...]  # digest, size, media type, file


def read_image(layout: Path, tag: str) -> Image:
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    blobs_dir = layout / "blobs" / "sha256"

    def path(digest: str) -> Path:
        return blobs_dir / digest.split(":", 1)[1]

    manifest_bytes = path(entry["digest"]).read_bytes()
    manifest = json.loads(manifest_bytes)
    layers = tuple(
        (layer["digest"], layer["size"], layer["mediaType"], path(layer["digest"]))
        for layer in manifest["layers"]
    )
    config = manifest["config"]["digest"]
    blobs = ((config, path(config)), *((d, p) for d, _, _, p in layers))
    return Image(layout, tag, manifest_bytes, manifest["mediaType"], blobs, layers)


def source_image(source: Path, work: Path) -> Path:
    """A one-layer gzip image of a tar of source, in an OCI layout under work."""
    from harness.images import write_oci_layout

    tar = subprocess.run(
        ["tar", "-C", "/", "--sort=name", "-cf", "-", str(source.relative_to("/"))],
        capture_output=True,
        check=True,
    ).stdout
    layout = work / "layout"
    write_oci_layout(layout, "latest", [tar])
    return layout


def tar_megabytes(layers: Sequence[tuple[str, int, str, Path]]) -> float:
    """Uncompressed size of the gzip layers (untimed; zstd layers are counted compressed)."""
    total = 0
    for _, _, media_type, path in layers:
        if not media_type.endswith(GZIP_SUFFIXES):
            total += path.stat().st_size
            continue
        inflater = zlib.decompressobj(wbits=47)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                total += len(inflater.decompress(chunk))
                while inflater.eof and inflater.unused_data:  # next gzip member
                    rest = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=47)
                    total += len(inflater.decompress(rest))
    return total / 1e6


def decompress_all(layers: Sequence[tuple[str, int, str, Path]]) -> None:
    gzip_files = [str(p) for _, _, mt, p in layers if mt.endswith(GZIP_SUFFIXES)]
    zstd_files = [str(p) for _, _, mt, p in layers if mt.endswith("zstd")]
    if gzip_files:
        subprocess.run(["gzip", "-dc", *gzip_files], stdout=subprocess.DEVNULL, check=True)
    if zstd_files:
        subprocess.run(["zstd", "-dc", *zstd_files], stdout=subprocess.DEVNULL, check=True)


def copy_image(host: str, source_repo: str, target_repo: str, image: Image) -> str:
    """The image in a fresh repository (blobs mounted, nothing uploaded twice); its reference."""
    from snapshotter.remote.access import RegistryAccess
    from snapshotter.remote.reference import Reference, Repository

    access = RegistryAccess.create(plain_http=(host,))
    with access.client() as client:
        source, target = Repository(host, source_repo), Repository(host, target_repo)
        for digest, path in image.blobs:
            client.push_blob(target, path, digest, mount_from=source)
        client.push_manifest(target, image.tag, image.manifest, image.manifest_media_type)
    return str(Reference(host, target_repo, tag=image.tag))


def export_revision(revision: str, into: Path) -> None:
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "snapshotter"], capture_output=True
    )
    if archive.returncode != 0:
        raise SystemExit(f"cannot export revision {revision!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def compile_tree(tree: Path) -> None:
    """Write tree's snapshotter bytecode (__pycache__, ignored by git), as an install does."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "snapshotter")],
        stdout=subprocess.DEVNULL,
        check=True,
    )


def build_command(
    tree: Path, reference: str, hosts_dir: Path, extra: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """`lazysnap index build` of tree's code: argv and environment (run it in tree)."""
    argv = [sys.executable, "-m", "snapshotter.cli", "index", "build", reference, "--plain-http"]
    argv += ["--hosts-dir", str(hosts_dir), "--no-shared-cache", *extra]
    return argv, {**os.environ, "PYTHONPATH": str(tree)}


def index_build(tree: Path, reference: str, hosts_dir: Path, extra: Sequence[str]) -> str:
    """Run `lazysnap index build` of tree's code; its summary line."""
    argv, env = build_command(tree, reference, hosts_dir, extra)
    # cwd: `-m` puts it first on sys.path, before PYTHONPATH
    result = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"index build ({tree}) failed: {result.stderr.strip()}")
    lines = [line for line in result.stdout.splitlines() if " indexed, " in line]
    return lines[-1] if lines else result.stdout.strip()


def stage_cpu(layers: Sequence[tuple[str, int, str, Path]]) -> list[tuple[str, float]]:
    """CPU seconds of each builder stage over the gzip layers, in this process (see --stages)."""
    import hashlib

    from snapshotter.index.block_inflate import BlockInflater, load_inflate_library
    from snapshotter.index.build import build_layer_index
    from snapshotter.index.codec import decode_index, encode_index_split
    from snapshotter.index.gzip_spans import GzipSpanBuilder
    from snapshotter.index.model import DEFAULT_SPAN_SIZE
    from snapshotter.index.tar_toc import TarTocParser

    gzip_layers = [(d, mt, p.read_bytes()) for d, _, mt, p in layers if mt.endswith(GZIP_SUFFIXES)]
    library = load_inflate_library()

    def timed(work: Callable[[], object]) -> float:
        started = time.process_time()
        work()
        return time.process_time() - started

    def sha256_all() -> None:
        for _, _, blob in gzip_layers:
            hasher, view = hashlib.sha256(), memoryview(blob)
            for at in range(0, len(blob), 1 << 20):
                hasher.update(view[at : at + (1 << 20)])

    def inflate_all() -> None:
        for _, _, blob in gzip_layers:
            inflater = BlockInflater(library)
            view = memoryview(blob)
            for at in range(0, len(blob), 1 << 20):
                inflater.feed(bytes(view[at : at + (1 << 20)]))
                while inflater.pending_input:
                    _, ended = inflater.inflate(1 << 20, stop_at_block=False)
                    if ended and inflater.pending_input:
                        inflater.reset()
            inflater.close()

    tars: list[list[bytes]] = []

    def spans_all(keep: bool) -> None:
        for _, _, blob in gzip_layers:
            parts: list[bytes] = []
            stream = io.BytesIO(blob)

            def sink(view: memoryview, parts: list[bytes] = parts) -> None:
                if keep:
                    parts.append(bytes(view))

            GzipSpanBuilder(stream.read, sink, DEFAULT_SPAN_SIZE).run()
            if keep:
                tars.append(parts)

    def parse_all() -> None:
        for parts in tars:
            parser = TarTocParser()
            for part in parts:
                parser.feed(part)
            parser.finish()

    indexes = []

    def build_all() -> None:
        for digest, media_type, blob in gzip_layers:
            indexes.append(
                build_layer_index(io.BytesIO(blob), media_type=media_type, expected_digest=digest)
            )

    encoded: list[bytes] = []

    def encode_all() -> None:
        encoded.extend(encode_index_split(index)[0] for index in indexes)

    def decode_all() -> None:
        for index, blob in zip(indexes, encoded, strict=True):
            decode_index(blob, expected_layer_digest=index.layer_digest)

    rows = [
        ("sha256 of the compressed stream (one pass)", timed(sha256_all)),
        ("inflate alone (zlib-ng, no hashing)", timed(inflate_all)),
        ("span builder: inflate + span digests + windows", timed(lambda: spans_all(False))),
    ]
    spans_all(True)  # untimed: the tar stream for the parser
    rows.append(("tar parser", timed(parse_all)))
    tars.clear()
    rows.append(("whole builder (build_layer_index, incl. layer digest)", timed(build_all)))
    rows.append(("index encoding (encode_index_split, windows zstd)", timed(encode_all)))
    rows.append(("index decoding (the static profile reads each index back)", timed(decode_all)))
    files = [str(p) for _, _, mt, p in layers if mt.endswith(GZIP_SUFFIXES)]
    before = children_cpu()
    subprocess.run(["gzip", "-dc", *files], stdout=subprocess.DEVNULL, check=True)
    rows.append(("reference: `gzip -dc` of the same blobs (user+sys)", children_cpu() - before))
    return rows


def perf_breakdown(argv: Sequence[str], env: dict[str, str], cwd: Path) -> str:
    """One run of argv under `perf record`: CPU seconds per process/thread, by library."""
    import collections
    import re

    if shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    frequency = 1999
    with tempfile.TemporaryDirectory(prefix="lazysnap-perf-") as scratch:
        data = str(Path(scratch) / "perf.data")
        subprocess.run(
            ["perf", "record", "-q", "-F", str(frequency), "-o", data, *argv],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "pid,tid,ip,sym,dso"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    kinds = (
        ("zlib_ng", "inflate"),
        ("libz.", "inflate"),
        ("libcrypto", "sha256"),
        ("backend_c", "zstd"),
        ("kallsyms", "kernel"),
        ("libpython", "interpreter"),
        ("libc.so", "libc"),
    )
    by_thread: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for line in script.splitlines():
        match = re.match(r"\s*(\d+)/(\d+)\s+.*\((.*)\)\s*$", line)
        if match is None:
            continue
        pid, tid, dso = match.groups()
        kind = next((name for key, name in kinds if key in dso), "other")
        by_thread[(pid, tid)][kind] += 1
    columns = ["inflate", "sha256", "interpreter", "zstd", "kernel", "libc", "other"]
    lines = [
        "| process / thread | CPU s | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    ranked = sorted(by_thread.items(), key=lambda item: -sum(item[1].values()))
    parent = min((int(pid) for pid, _ in by_thread), default=0)  # started first (no pid wrap)
    for (pid, tid), counts in ranked:
        total = sum(counts.values()) / frequency
        if total < 0.01:
            continue
        if int(pid) != parent:
            what = f"layer worker {pid}"
        else:
            what = "build process, main thread" if pid == tid else f"build process, thread {tid}"
        cells = " | ".join(f"{counts[c] / frequency:.3f}" for c in columns)
        lines.append(f"| {what} | {total:.3f} | {cells} |")
    everything = sum(sum(c.values()) for c in by_thread.values()) / frequency
    lines.append(
        f"\nAll processes and threads: {everything:.2f} CPU s (perf samples at {frequency} Hz)."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index_build_e2e", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trials", type=int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--baseline", metavar="REV", help="also time the build of this git rev")
    parser.add_argument("--source", metavar="DIR", help="index a tar of DIR instead of pybig")
    parser.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `index build` argument for every build (repeatable, e.g. --build-arg=--jobs=1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: 1 trial over a tar of {QUICK_SOURCE}"
    )
    parser.add_argument(
        "--stages", action="store_true", help="also print the builder's CPU seconds by stage"
    )
    parser.add_argument(
        "--perf", action="store_true", help="also run one build under perf record (CPU by thread)"
    )
    args = parser.parse_args()
    trials = args.trials if args.trials is not None else (1 if args.quick else 5)
    if trials < 1:
        parser.error("--trials must be >= 1")
    extra = list(args.build_arg)
    source = args.source or (QUICK_SOURCE if args.quick else None)
    if source is not None:
        extra = ["--min-layer-size", "1", *extra]  # a source image may be smaller than 10 MiB

    from harness.containerd import write_hosts_toml
    from harness.images import push, read_layout
    from harness.registry import start_registry

    work = Path(tempfile.mkdtemp(prefix="lazysnap-bench-e2e-"))
    registry = None
    try:
        if source is not None:
            layout = source_image(Path(source).resolve(), work)
        else:
            layout = TEST_IMAGES / "pybig"
            if not (layout / ".complete").exists():
                raise SystemExit(f"{layout} is not built: run scripts/build-test-images.sh")
        image = read_image(layout, "latest")
        trees = {"`lazysnap index build`": REPO}
        if args.baseline:
            export_revision(args.baseline, work / "baseline")
            trees[f"`lazysnap index build` @ {args.baseline}"] = work / "baseline"
        for tree in trees.values():
            compile_tree(tree)
        tar_mb = tar_megabytes(image.layers)
        registry = start_registry(work / "registry")
        hosts_dir = work / "hosts"
        write_hosts_toml(hosts_dir, registry.host)
        push(read_layout(layout, "latest"), registry.host, "bench/source")
        gzip_row = Row("`gzip -dc` of the layer blobs (reference)")
        rows = [gzip_row, *(Row(label) for label in trees)]
        for trial in range(trials):
            order = rows[trial % len(rows) :] + rows[: trial % len(rows)]  # rotate
            for row in order:
                if row is not gzip_row:
                    repo = f"t{trial}r{rows.index(row)}/image"  # own namespace: own index cache
                    reference = copy_image(registry.host, "bench/source", repo, image)
                cpu, registry_cpu = children_cpu(), process_cpu(registry.service.pid)
                started = time.perf_counter()
                if row is gzip_row:
                    decompress_all(image.layers)
                else:
                    row.last_output = index_build(trees[row.what], reference, hosts_dir, extra)
                row.seconds.append(time.perf_counter() - started)
                row.cpu.append(children_cpu() - cpu)
                row.registry_cpu.append(process_cpu(registry.service.pid) - registry_cpu)
            print(
                f"trial {trial + 1}: " + ", ".join(f"{r.seconds[-1]:.2f} s" for r in rows),
                file=sys.stderr,
            )
        compressed = sum(size for _, size, _, _ in image.layers) / 1e6
        print(f"Command: `{command_line()}`  ")
        print(
            f"Image: {layout} ({len(image.layers)} layers, {compressed:.1f} MB compressed, "
            f"{tar_mb:.1f} MB of tar); {trials} trials, interleaved in rotating order, "
            f"whole commands, median (min-max); load average at the end "
            f"{os.getloadavg()[0]:.1f}. Build arguments: "
            f"`--no-shared-cache {' '.join(extra)}`.\n"
        )
        print(
            "| command | median s | min-max s | MB/s of tar | speed / `gzip -dc` "
            "| CPU s (user+sys) | registry CPU s |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(row.line(gzip_row, tar_mb))
        for row in rows[1:]:
            print(f"\n{row.what}, last run: `{row.last_output}`")
        if args.stages:
            print("\n| builder stage, in one process, all gzip layers | CPU s |\n|---|---|")
            for what, seconds in stage_cpu(image.layers):
                print(f"| {what} | {seconds:.3f} |")
        if args.perf:
            reference = copy_image(registry.host, "bench/source", "perf/image", image)
            argv, env = build_command(REPO, reference, hosts_dir, extra)
            print("\nOne `lazysnap index build` under perf record:\n")
            print(perf_breakdown(argv, env, REPO))
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
