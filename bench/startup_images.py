"""The benchmark's images, pushed once per run, and their lazysnap indexes (built once, outside
the timed part).

- busybox: harness's busybox-static image (1 small gzip layer: never indexed).
- pybig: the cached big python image (scripts/build-test-images.sh).
- seqread: busybox + one gzip layer holding the `readtime` tool and one file of realistic,
  compressible content (concatenated /usr/lib files), cached under the results dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.daemon import lazysnap_command
from harness.images import (
    BuiltImage,
    PushedImage,
    build_busybox,
    busybox_layer_tar,
    file,
    layer_tar,
    push,
    read_layout,
    write_oci_layout,
)
from harness.procs import HarnessError, run

READTIME_SOURCE = Path(__file__).resolve().parent / "readtime" / "main.go"
SEQREAD_FILE = "/data/big"
READTIME_PATH = "/bench/readtime"
SEQREAD_RECIPE = "seqread 1: busybox + (readtime, /data/big of /usr/lib files)"
TEST_IMAGES = Path(os.environ.get("LAZYSNAP_TEST_IMAGES", "/var/cache/lazysnap-test-images"))

Progress = Callable[[str], None]


def build_readtime(cache: Path) -> Path:
    """Compile readtime (static Go binary) once; rebuilt when its source changes."""
    binary = cache / "readtime"
    if binary.exists() and binary.stat().st_mtime >= READTIME_SOURCE.stat().st_mtime:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOCACHE": str(cache / "go-build"), "GOFLAGS": ""}
    tmp = binary.with_name("readtime.tmp")
    result = subprocess.run(
        [
            "go",
            "build",
            "-trimpath",
            "-ldflags=-s -w -buildid=",
            "-o",
            str(tmp),
            str(READTIME_SOURCE),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise HarnessError(f"go build {READTIME_SOURCE} failed: {result.stderr.strip()}")
    tmp.rename(binary)
    return binary


def realistic_content(size: int, source: Path = Path("/usr/lib")) -> bytes:
    """size bytes of real binaries and libraries (compress like a typical layer: ~2.5-3x),
    files concatenated in sorted path order so the same machine gives the same bytes."""
    chunks: list[bytes] = []
    total = 0
    for directory, subdirs, names in os.walk(source):
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            chunks.append(data[: size - total])
            total += len(chunks[-1])
            if total >= size:
                return b"".join(chunks)
    raise HarnessError(f"{source} holds fewer than {size} bytes of regular files")


def build_seqread(cache: Path, size: int, progress: Progress) -> BuiltImage:
    """The sequential-read image, cached in cache/seqread-<size> (marker file .complete)."""
    layout = cache / f"seqread-{size}"
    marker = layout / ".complete"
    if marker.exists() and marker.read_text() == SEQREAD_RECIPE:
        return read_layout(layout, "latest")
    progress(f"building the seqread image ({size / 1e6:.0f} MB file, gzip) in {layout}")
    readtime = build_readtime(cache)
    data_layer = layer_tar(
        [
            file(READTIME_PATH.lstrip("/"), readtime.read_bytes(), 0o755),
            file(SEQREAD_FILE.lstrip("/"), realistic_content(size)),
        ]
    )
    built = write_oci_layout(
        layout, "latest", [busybox_layer_tar(cache), data_layer], cmd=("/bin/sh",)
    )
    marker.write_text(SEQREAD_RECIPE)
    return built


def prepare_images(
    cache: Path, seqread_size: int, names: set[str], progress: Progress
) -> dict[str, BuiltImage]:
    """Build (or find in the caches) the images the chosen workloads need."""
    images: dict[str, BuiltImage] = {}
    if "busybox" in names:
        images["busybox"] = build_busybox(cache / "busybox")
    if "pybig" in names:
        layout = TEST_IMAGES / "pybig"
        if not (layout / ".complete").exists():
            raise HarnessError(f"{layout} is not built: run scripts/build-test-images.sh")
        images["pybig"] = read_layout(layout, "latest")
    if "seqread" in names:
        images["seqread"] = build_seqread(cache, seqread_size, progress)
    return images


def push_images(images: dict[str, BuiltImage], registry_host: str) -> dict[str, PushedImage]:
    return {name: push(image, registry_host, f"bench/{name}") for name, image in images.items()}


def inflate_rate(image: BuiltImage, limit: int = 64 << 20) -> tuple[str, float]:
    """Single-core inflate rate (uncompressed MB/s) over the image's largest layer, with the
    inflater lazysnap uses (zlib-ng when installed, else zlib): the ceiling of a cold lazy
    read of a gzip layer."""
    inflater_module: types.ModuleType
    try:
        from zlib_ng import zlib_ng as inflater_module
    except ImportError:
        inflater_module = zlib
    layer = max(image.layers, key=lambda layer: layer.size)
    blob = image.layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
    with open(blob, "rb") as handle:
        compressed = handle.read(limit)
    inflater = inflater_module.decompressobj(wbits=31)
    start = time.perf_counter()
    produced = len(inflater.decompress(compressed))
    rate = produced / (time.perf_counter() - start) / 1e6
    return inflater_module.__name__.rsplit(".", 1)[-1], rate


def lazysnap_subcommand(name: str) -> list[str]:
    """argv prefix for `lazysnap pull` / `lazysnap index`: the console script once cli.py wires
    the subcommand, else the module's own entry point."""
    base = lazysnap_command()
    if subprocess.run([*base, name, "--help"], capture_output=True, check=False).returncode == 0:
        return [*base, name]
    if name == "pull":
        return [sys.executable, "-m", "snapshotter.pull"]
    if name == "index":
        script = (
            "import argparse, sys\n"
            "from snapshotter.indexer import command\n"
            "parser = argparse.ArgumentParser(prog='lazysnap index')\n"
            "command.add_arguments(parser)\n"
            "sys.exit(command.run(parser.parse_args()))\n"
        )
        return [sys.executable, "-c", script]
    raise HarnessError(f"no lazysnap subcommand {name!r}")


@dataclass(frozen=True)
class IndexOutcome:
    ok: bool
    seconds: float
    message: str  # the command's summary line, or its error


def build_index(reference: str, hosts_dir: Path, extra: Sequence[str] = ()) -> IndexOutcome:
    """`lazysnap index build` for one pushed image (untimed setup of the lazy configuration);
    extra: more index build options, e.g. ("--span-size", "1M")."""
    argv = [
        *lazysnap_subcommand("index"),
        "build",
        reference,
        "--plain-http",
        "--hosts-dir",
        str(hosts_dir),
        *extra,
    ]
    start = time.perf_counter()
    try:
        result = run(argv, f"index build {reference}", timeout=1800)
    except HarnessError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "failed"
        return IndexOutcome(False, time.perf_counter() - start, last)
    lines = result.stdout.strip().splitlines()
    return IndexOutcome(True, time.perf_counter() - start, lines[-1] if lines else "done")
