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
        [--build-arg=--jobs=1]... [--quick]
"""

from __future__ import annotations

import argparse
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
from collections.abc import Sequence
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


def index_build(tree: Path, reference: str, hosts_dir: Path, extra: Sequence[str]) -> str:
    """Run `lazysnap index build` of tree's code; its summary line."""
    argv = [sys.executable, "-m", "snapshotter.cli", "index", "build", reference, "--plain-http"]
    argv += ["--hosts-dir", str(hosts_dir), "--no-shared-cache", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd: `-m` puts it first on sys.path, before PYTHONPATH
    result = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"index build ({tree}) failed: {result.stderr.strip()}")
    lines = [line for line in result.stdout.splitlines() if " indexed, " in line]
    return lines[-1] if lines else result.stdout.strip()


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
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
