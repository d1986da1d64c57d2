"""Stress: real FUSE mounts of real layers, hammered by several processes under page-cache
pressure, compared byte for byte with the tar extracted by Python's tarfile.

Layers: pigz gzip (1 MiB spans), Python gzip (4 MiB and 64 KiB spans), zstd frames (1 MiB
spans). Every layer is mounted twice, and the pigz blob a third time with a 4 MiB-span index, so
several mount processes share a blob's cached spans, numbered two ways. Every mount shares one
span cache a few spans large (constant eviction), prefetch and background fetch are on. The
reader processes run in a memory cgroup smaller than what they read (the kernel keeps reclaiming
their pages and reading them again through FUSE) and also drop pages with fadvise.

Bounded to ~30-60 s by default. Longer and harsher:
    LAZYSNAP_STRESS_SECONDS=600      how long the readers hammer
    LAZYSNAP_STRESS_LONG=1           bigger layers (a 40 MB file), plain tar and zstd 4 MiB too
    LAZYSNAP_STRESS_DROP_CACHES=1    also echo 1 > /proc/sys/vm/drop_caches every 0.5 s (global:
                                     slows everyone else's tests on the machine)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.url_blob import served_blob_spec
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.cache import SpanCache
from snapshotter.index.codec import encode_index
from snapshotter.index.model import LayerIndex
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.sidecars import read_state
from tests.fs.fs_helpers import BlobServer
from tests.stress.stress_layers import (
    MiB,
    compress,
    extract,
    index_for,
    make_stress_tar,
    regular_files,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SECONDS = float(os.environ.get("LAZYSNAP_STRESS_SECONDS", "20"))
LONG = os.environ.get("LAZYSNAP_STRESS_LONG") == "1"
DROP_CACHES = os.environ.get("LAZYSNAP_STRESS_DROP_CACHES") == "1"
READER_PROCESSES = 3
THREADS_PER_READER = 4
READER_MEMORY_LIMIT = 192 * MiB
REPO_ROOT = Path(__file__).resolve().parents[2]
MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str
    span_size: int
    other_span_size: int  # > 0: also mount the blob with an index of this span size
    large_sizes: tuple[int, ...]
    small_files: int
    source: str  # "file" or "url"


def _plans() -> list[LayerPlan]:
    plans = [
        LayerPlan("pigz-1m", "pigz", MiB, 4 * MiB, (6 * MiB, 5 * MiB, 3 * MiB + 123), 250, "file"),
        LayerPlan("gzip-4m", "gzip", 4 * MiB, 0, (9 * MiB + 7, 2 * MiB), 150, "url"),
        LayerPlan("zstd-1m", "zstd", MiB, 0, (7 * MiB + 4095, 3 * MiB), 150, "file"),
        # the profile tests' layers: Python gzip in 64 KiB spans (a 1 MiB read spans ~16)
        LayerPlan("gzip-64k", "gzip", 64 << 10, 0, (3 * MiB + 1,), 100, "file"),
    ]
    if LONG:
        plans += [
            LayerPlan("pigz-big", "pigz", 4 * MiB, MiB, (40 * MiB, 12 * MiB), 800, "url"),
            LayerPlan("tar-1m", "tar", MiB, 0, (8 * MiB, 3 * MiB), 200, "file"),
            LayerPlan("zstd-4m", "zstd", 4 * MiB, MiB, (20 * MiB + 1, 6 * MiB), 300, "file"),
        ]
    return plans


@dataclass
class Mounted:
    mountpoint: Path
    reference: Path
    index: LayerIndex


@dataclass
class Stand:
    mounts: list[Mounted]
    manager: LazyLayers
    cache_dir: Path
    cache_max: int
    overlay: Path  # a read-only overlayfs over the first mount of each layer, as containers see
    overlay_layers: list[Mounted]  # its lower layers, top first


def _require_root_and_fuse() -> None:
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("needs root and /dev/fuse")


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[Stand]:
    _require_root_and_fuse()
    servers: list[BlobServer] = []
    cache_dir = tmp_path / "cache"
    largest_span = 0
    prepared: list[tuple[Path, Path, LayerIndex, LayerSpec]] = []
    for seed, plan in enumerate(_plans()):
        tar = make_stress_tar(seed, small_files=plan.small_files, large_sizes=plan.large_sizes)
        blob = compress(tar, plan.kind)
        reference = tmp_path / f"{plan.name}.ref"
        extract(tar, reference)
        blob_path = tmp_path / f"{plan.name}.blob"
        blob_path.write_bytes(blob)
        span_sizes = [plan.span_size] + ([plan.other_span_size] if plan.other_span_size else [])
        indexes = {size: index_for(blob, plan.kind, size) for size in span_sizes}
        for copy, span_size in enumerate([plan.span_size, *span_sizes]):
            index = indexes[span_size]
            largest_span = max(largest_span, *(s.uncompressed_size for s in index.spans))
            if plan.source == "url":
                server = BlobServer(blob)
                servers.append(server)
                blob_spec = served_blob_spec(server.url, index.layer_digest, len(blob))
            else:
                blob_spec = BlobSpec("file", str(blob_path), index.layer_digest)
            names = [f.rel for f in regular_files(index)]
            spec = LayerSpec(
                blob=blob_spec,
                index_bytes=encode_index(index),
                prefetch_names=tuple(names[:: max(1, len(names) // 12)]),
            )
            prepared.append((tmp_path / "mnt" / f"{plan.name}.{copy}", reference, index, spec))
    cache_max = 3 * largest_span  # a few spans: every mount keeps evicting the others' spans
    manager = LazyLayers(
        LazyLayerSettings(
            str(cache_dir),
            cache_max,
            fetch_timeout=60,
            background=BackgroundSettings(enabled=True, quiet_seconds=0.3, rate_bytes=256 * MiB),
        )
    )
    mounts: list[Mounted] = []
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    overlaid = False
    try:
        for mountpoint, reference, index, spec in prepared:
            mountpoint.mkdir(parents=True)
            manager.mount_layer(str(mountpoint), spec)
            mounts.append(Mounted(mountpoint, reference, index))
        lowers = [m for m in reversed(mounts) if m.mountpoint.name.endswith(".0")]
        lowerdir = ":".join(str(m.mountpoint) for m in lowers)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(overlay)],
            check=True,
        )
        overlaid = True
        yield Stand(mounts, manager, cache_dir, cache_max, overlay, lowers)
    finally:
        if overlaid:
            subprocess.run(["umount", str(overlay)], check=False)
        for mounted in mounts:
            manager.unmount(str(mounted.mountpoint))
        for server in servers:
            server.stop()


@contextlib.contextmanager
def _memory_cgroup(limit: int) -> Iterator[Path | None]:
    """A v1 memory cgroup for the readers (None where there is none); removed afterwards."""
    if not (MEMORY_CGROUPS / "cgroup.procs").exists():
        yield None
        return
    group = MEMORY_CGROUPS / f"lazysnap-stress-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        deadline = time.monotonic() + 10
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        group.rmdir()


@contextlib.contextmanager
def _dropping_caches(enabled: bool) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            Path("/proc/sys/vm/drop_caches").write_text("1\n")

    thread = threading.Thread(target=loop, daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join()


@dataclass
class _ReaderFile:
    """One file as tests/stress/hammer.py takes it (see its FilePlan)."""

    mounts: list[str]
    rel: str
    reference: str
    size: int
    boundaries: list[int]
    executable: bool


def _reader_plan(stand: Stand, seed: int, cgroup: Path | None, seconds: float) -> dict[str, object]:
    files: dict[str, _ReaderFile] = {}  # by reference path: every mount showing that file
    for mounted in stand.mounts:
        for f in regular_files(mounted.index):
            key = f"{mounted.reference}/{f.rel}"
            entry = files.setdefault(
                key, _ReaderFile([], f.rel, key, f.size, [], f.rel == "bin/busybox")
            )
            entry.mounts.append(str(mounted.mountpoint))
            entry.boundaries = sorted({*entry.boundaries, *f.boundaries})
    # Through the overlay a path shows the topmost layer's file.
    seen: set[str] = set()
    for mounted in stand.overlay_layers:
        for f in regular_files(mounted.index):
            if f.rel not in seen:
                seen.add(f.rel)
                files[f"{mounted.reference}/{f.rel}"].mounts.append(str(stand.overlay))
    return {
        "seconds": seconds,
        "threads": THREADS_PER_READER,
        "seed": seed,
        "cgroup_procs": str(cgroup / "cgroup.procs") if cgroup else "",
        "files": [dataclasses.asdict(f) for f in files.values()],
    }


def _log_problems(stand: Stand) -> list[str]:
    lines = []
    for mounted in stand.mounts:
        log = mounted.mountpoint.with_name(mounted.mountpoint.name + ".lazysnap.log")
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text(errors="replace").splitlines():
                if "EIO" in line or "Traceback" in line or "ERROR" in line:
                    lines.append(f"{log.name}: {line}")
    return lines


def test_lazy_reads_under_pressure_match_the_extracted_tar(stand: Stand, tmp_path: Path) -> None:
    readers: list[subprocess.Popen[str]] = []
    with _memory_cgroup(READER_MEMORY_LIMIT) as cgroup, _dropping_caches(DROP_CACHES):
        try:
            for seed in range(READER_PROCESSES):
                plan_path = tmp_path / f"reader-{seed}.json"
                plan_path.write_text(json.dumps(_reader_plan(stand, seed, cgroup, SECONDS)))
                readers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.stress.hammer", str(plan_path)],
                        cwd=REPO_ROOT,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            results = [reader.communicate(timeout=SECONDS + 120) for reader in readers]
        finally:
            for reader in readers:
                if reader.poll() is None:
                    reader.kill()
                    reader.wait()
    summaries = []
    for reader, (out, err) in zip(readers, results, strict=True):
        assert reader.returncode == 0, f"reader died ({reader.returncode}): {err[-3000:]}"
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    totals = {
        k: sum(s[k] for s in summaries) for k in ("reads", "bytes", "mmaps", "execs", "drops")
    }
    print(f"stress readers: {totals}, cgroup {cgroup}, drop_caches {DROP_CACHES}")
    counters = [(read_state(str(m.mountpoint)) or {}).get("counters", {}) for m in stand.mounts]
    fetched = sum(c.get("spans_fetched", 0) for c in counters)
    print(f"mount counters: spans fetched {fetched}, {counters}")
    mismatches = [m for s in summaries for m in s["mismatches"]]
    errors = [e for s in summaries for e in s["errors"]]
    problems = _log_problems(stand)
    assert not mismatches, json.dumps(mismatches[:5], indent=1)
    assert not errors, json.dumps(errors[:5], indent=1) + "\n" + "\n".join(problems[:20])
    assert not problems, "\n".join(problems[:20])
    assert sum(s["reads"] for s in summaries) > 1000  # the readers really ran
    assert not any(c.get("fetch_errors") for c in counters), counters
    # the tiny cache made mounts fetch spans again after eviction (the paths under test)
    assert fetched > sum(len(m.index.spans) for m in stand.mounts[::2])
    assert sum(s["drops"] for s in summaries) > 10
    assert SpanCache(stand.cache_dir, stand.cache_max).usage().bytes <= stand.cache_max
