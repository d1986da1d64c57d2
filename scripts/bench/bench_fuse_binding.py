#!/usr/bin/env python3
"""FUSE binding benchmark: fusepy 3.0.1 on libfuse2 against mfusepy on libfuse3 (lazysnap's choice).

Each configuration mounts the same minimal read-only filesystem in its own process: /big, a file
of random bytes held in memory, and /d/, a directory of small files. Both bindings run
multithreaded with kernel_cache; mfusepy is set up as snapshotter/fs/fuse_ops.py sets it up
(libfuse3, its thread counts), and the "ra4M" configurations raise the mount's bdi read_ahead_kb
to 4096 right after mounting, as snapshotter/fs/mount_process.py does. Per configuration,
interleaved over the trials: cold sequential read of /big in 1 MiB read() calls after
`echo 3 > /proc/sys/vm/drop_caches`, the FUSE READ request sizes the FS saw, the FS process's
CPU seconds per GB, a warm re-read, and a cold os.stat of every file in /d/.

    sudo /opt/lazysnap-venv/bin/python scripts/bench/bench_fuse_binding.py [--trials 5]

Needs root (drop_caches, sysfs, mounting) and fusepy, which is not a project dependency:
`/opt/lazysnap-venv/bin/pip install fusepy==3.0.1` (or leave it out with --configs).
Prints a markdown table of medians [min-max]; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import errno
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
BIG_NAME = "big"
SMALL_DIR = "d"
SMALL_SIZE = 4096
READ_CHUNK = 1 << 20  # the benchmark's read() size: what `dd bs=1M` or a big cp issues
RA4M_KB = 4096
MOUNT_WAIT_S = 60.0  # generating the random file comes first; 256 MiB takes ~1 s
STOP_WAIT_S = 10.0


@dataclass(frozen=True)
class Config:
    """One FUSE setup under test."""

    key: str  # what --configs names
    label: str  # what the table shows
    binding: str  # "fusepy" or "mfusepy"
    read_ahead_kb: int | None  # raised after mounting; None keeps the kernel's default


CONFIGS = (
    Config("fusepy", "fusepy 3.0.1, libfuse2", "fusepy", None),
    Config("fusepy-ra4M", "fusepy 3.0.1, libfuse2, ra4M", "fusepy", RA4M_KB),
    Config("mfusepy3", "mfusepy, libfuse3", "mfusepy", None),
    Config("mfusepy3-ra4M", "mfusepy, libfuse3, ra4M (lazysnap)", "mfusepy", RA4M_KB),
)


# ---------------------------------------------------------------- the filesystem (child process)


class BenchFS:
    """Read-only tree: /big (random bytes in memory) and /d/fNNNNN (small files).

    Plain methods (no binding base class) so one class serves both bindings; OSError with an
    errno is how both report an error to the kernel. Counts every READ so the driver can ask
    which request sizes the kernel sent.
    """

    use_ns = True  # times are integers in ns (both bindings warn otherwise)

    def __init__(self, big: bytes, small_count: int) -> None:
        self.big = big
        self.small = bytes(SMALL_SIZE)
        self.small_names = [small_name(i) for i in range(small_count)]
        self.small_set = frozenset(self.small_names)
        self.counter_lock = threading.Lock()  # not 'lock': a FUSE operation of that name
        self.read_sizes: dict[int, int] = {}
        self.getattrs = 0

    def take_counters(self) -> dict[str, Any]:
        """Counters since the last call, and the process CPU time so far."""
        with self.counter_lock:
            sizes, self.read_sizes = self.read_sizes, {}
            getattrs, self.getattrs = self.getattrs, 0
        return {
            "reads": sum(sizes.values()),
            "max_read": max(sizes, default=0),
            "read_bytes": sum(size * count for size, count in sizes.items()),
            "getattrs": getattrs,
            "cpu_s": time.process_time(),
        }

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        with self.counter_lock:
            self.getattrs += 1
        if path == "/" or path == f"/{SMALL_DIR}":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        if path == f"/{BIG_NAME}":
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": len(self.big)}
        parent, _, name = path.rpartition("/")
        if parent == f"/{SMALL_DIR}" and name in self.small_set:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": SMALL_SIZE}
        raise OSError(errno.ENOENT, path)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path == "/":
            return [".", "..", BIG_NAME, SMALL_DIR]
        if path == f"/{SMALL_DIR}":
            return [".", "..", *self.small_names]
        raise OSError(errno.ENOTDIR, path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.counter_lock:
            self.read_sizes[size] = self.read_sizes.get(size, 0) + 1
        if path == f"/{BIG_NAME}":
            return self.big[offset : offset + size]
        return self.small[offset : offset + size]


class FusepyFS(BenchFS):
    """fusepy dispatches every call through the operations object's __call__."""

    def __call__(self, op: str, *args: Any) -> Any:
        method = getattr(self, op, None)
        if method is None:
            raise OSError(errno.ENOSYS, op)
        return method(*args)


def small_name(index: int) -> str:
    return f"f{index:05d}"


def serve(binding: str, mountpoint: str, size: int, small_count: int) -> int:
    """Child process: mount, answer stats requests on stdin/stdout, block until unmounted."""
    fuse_class: Any  # the binding's FUSE class: constructing it mounts and serves
    if binding == "fusepy":
        import fuse  # type: ignore[import-untyped]  # fusepy: not a project dependency

        library = str(fuse._libfuse._name)
        major = 2 if "libfuse.so.2" in library else 0
        fuse_class = fuse.FUSE
        fs: BenchFS = FusepyFS(os.urandom(size), small_count)
        # libfuse2's own knobs for big reads, so fusepy is not blamed for a missing option;
        # libfuse2 does not negotiate max_pages, so the kernel still caps READs at 128 KiB.
        options: dict[str, Any] = {"max_read": 1 << 20, "max_readahead": 1 << 20}
    else:
        sys.path.insert(0, str(REPO))
        from snapshotter.fs import fuse_ops  # selects libfuse3 exactly as lazysnap does

        mfusepy = importlib.import_module("mfusepy")  # the module fuse_ops set up
        library = str(os.environ.get("FUSE_LIBRARY_PATH"))
        major = int(mfusepy.fuse_version_major)
        fuse_class = mfusepy.FUSE
        fs = BenchFS(os.urandom(size), small_count)
        options = {
            "max_threads": fuse_ops.MAX_THREADS,
            "max_idle_threads": fuse_ops.MAX_THREADS // 2,
        }
    options.update(foreground=True, ro=True, kernel_cache=True, fsname=f"fusebench-{binding}")
    watch = DriverWatch(Path(mountpoint))
    watch.reply({"library": library, "fuse_major": major})
    threading.Thread(target=watch.answer, args=(fs,), daemon=True).start()
    fuse_class(fs, mountpoint, **options)  # multithreaded: neither is given nothreads
    if watch.driver_gone.is_set():  # unmounted by the watch: let it finish removing
        watch.cleaned_up.wait(STOP_WAIT_S)
    return 0


@dataclass
class DriverWatch:
    """The FS process's side of the driver's pipes: answers stats requests and, if the driver
    dies without stopping it (SIGKILL), unmounts and removes what the driver would have."""

    mountpoint: Path
    driver_gone: threading.Event = field(default_factory=threading.Event)
    cleaned_up: threading.Event = field(default_factory=threading.Event)

    def reply(self, message: dict[str, Any]) -> None:
        try:
            sys.stdout.write("BENCH " + json.dumps(message) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.clean_up_and_exit()

    def answer(self, fs: BenchFS) -> None:
        # Wait for the mount first, so an early EOF cannot race libfuse's mounting.
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _line in sys.stdin:
            self.reply(fs.take_counters())
        self.clean_up_and_exit()  # stdin closed: the driver is gone

    def clean_up_and_exit(self) -> None:
        self.driver_gone.set()
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        base = self.mountpoint.parent
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
        with contextlib.suppress(OSError):
            (base / f"{self.mountpoint.name}.log").unlink()
        with contextlib.suppress(OSError):
            base.rmdir()  # the last FS process to go removes the driver's temp dir
        self.cleaned_up.set()
        os._exit(0)  # libfuse's threads are blocked on /dev/fuse: no orderly way out


# ---------------------------------------------------------------- the driver


@dataclass
class MountedFS:
    """One configuration's filesystem process and its mount."""

    config: Config
    mountpoint: Path
    process: subprocess.Popen[str]
    log_path: Path
    read_ahead_kb: int = 0  # what the bdi had when measured

    def ask(self) -> dict[str, Any]:
        """Counters since the last ask (the FS resets them)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("stats\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.gone() from None
        return self.message()

    def message(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("BENCH "):
                return dict(json.loads(line[len("BENCH ") :]))
        raise self.gone()

    def gone(self) -> BenchError:
        return BenchError(
            f"{self.config.label}: FS process {self.process.pid} exited ({self.mountpoint})"
            f"\n{self.log_tail()}".rstrip()
        )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """Unmount and end the process; lazy-unmount and kill what does not go by itself."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # libfuse unmounts on its way out
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class BenchError(Exception):
    """A failure worth one clear line to the user, not a traceback."""


@dataclass
class Sample:
    cold_mb_s: float
    reads: int
    max_read: int
    cpu_s_per_gb: float
    warm_mb_s: float
    warm_reads: int
    stat_us: float
    # drop_caches by other processes between ours and the end of the warm re-read: the shared
    # machine's other benchmarks do that, and then the "warm" re-read was not warm
    foreign_drops: int


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def is_mounted(path: Path) -> bool:
    # Not os.path.ismount: a dead FUSE mount fails stat() with ENOTCONN and looks unmounted.
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def drop_caches() -> int:
    """Drop the page cache, dentries and inodes; the machine's drop count afterwards."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return drop_count()


def drop_count() -> int:
    """How often anyone wrote drop_caches since boot: /proc/vmstat drop_pagecache + drop_slab
    (dropping only the slab evicts unused inodes, and their cached pages with them)."""
    with open("/proc/vmstat", encoding="ascii") as vmstat:
        counters = dict(line.split() for line in vmstat)
    return int(counters.get("drop_pagecache", 0)) + int(counters.get("drop_slab", 0))


def start_fs(config: Config, base: Path, size: int, small_count: int) -> MountedFS:
    mountpoint = base / config.key
    mountpoint.mkdir()
    env = dict(os.environ)
    env.pop("FUSE_LIBRARY_PATH", None)  # each binding picks its own libfuse
    log_path = base / f"{config.key}.log"
    command = [sys.executable, __file__, "--serve", config.binding, str(mountpoint)]
    command += ["--size-mb", str(size >> 20), "--files", str(small_count)]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            # its own session: the driver alone decides when it stops, even on Ctrl-C
            start_new_session=True,
        )
    mounted = MountedFS(config, mountpoint, process, log_path)
    return mounted


def wait_mounted(mounted: MountedFS, want_major: int) -> None:
    info = mounted.message()
    if info["fuse_major"] != want_major:
        raise BenchError(
            f"{mounted.config.label}: FS process loaded {info['library']}, not libfuse{want_major}"
        )
    deadline = time.monotonic() + MOUNT_WAIT_S
    while not is_mounted(mounted.mountpoint):
        if mounted.process.poll() is not None:
            raise BenchError(f"{mounted.config.label}: mount failed\n{mounted.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{mounted.config.label}: {mounted.mountpoint} not mounted in time")
        time.sleep(0.01)
    device = os.stat(mounted.mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    if mounted.config.read_ahead_kb is not None:
        bdi.write_text(f"{mounted.config.read_ahead_kb}\n")
    mounted.read_ahead_kb = int(bdi.read_text())


def timed_read(path: Path, buffer: bytearray) -> tuple[float, int]:
    """(seconds, bytes) to read the whole file in READ_CHUNK read() calls."""
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(view):
            total += count
    return time.perf_counter() - start, total


def measure(mounted: MountedFS, size: int, small_count: int, buffer: bytearray) -> Sample:
    big = mounted.mountpoint / BIG_NAME
    drops = drop_caches()
    before = mounted.ask()
    cold_s, got = timed_read(big, buffer)
    cold = mounted.ask()
    if got != size:
        raise BenchError(f"{big}: read {got} bytes, expected {size}")
    warm_s, _ = timed_read(big, buffer)
    warm = mounted.ask()
    foreign_drops = drop_count() - drops
    names = [mounted.mountpoint / SMALL_DIR / small_name(i) for i in range(small_count)]
    drop_caches()
    start = time.perf_counter()
    for name in names:
        os.stat(name)
    stat_s = time.perf_counter() - start
    return Sample(
        cold_mb_s=size / cold_s / 1e6,
        reads=cold["reads"],
        max_read=cold["max_read"],
        cpu_s_per_gb=(cold["cpu_s"] - before["cpu_s"]) / (size / 1e9),
        warm_mb_s=size / warm_s / 1e6,
        warm_reads=warm["reads"],
        stat_us=stat_s / small_count * 1e6,
        foreign_drops=foreign_drops,
    )


def spread(values: Sequence[float], digits: int) -> str:
    """median [min-max]"""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def report(
    results: Results,
    mounted: dict[str, MountedFS],
    args: argparse.Namespace,
    load_before: tuple[float, float, float],
) -> str:
    load_after = os.getloadavg()
    lines = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, kernel {platform.release()}, "
        f"{os.cpu_count()} cores, {args.trials} trials interleaved, /{BIG_NAME} "
        f"{args.size_mb} MiB read in 1 MiB read() calls, {args.files} files of 4 KiB in "
        f"/{SMALL_DIR}/. Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}.",
        f"Versions: {versions()}.",
        "",
        "| config | bdi read_ahead_kb | FUSE READ max | READs per cold read | "
        "cold seq MB/s | FS CPU s/GB (cold) | warm re-read MB/s | cold stat µs/file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for key, samples in results.samples.items():
        fs = mounted[key]
        max_reads = sorted({s.max_read for s in samples})
        # A re-read after someone else's drop_caches measures a cold read: leave it out.
        warm = [s.warm_mb_s for s in samples if s.foreign_drops == 0]
        warm_text = spread(warm, 0) if warm else "n/a"
        if len(warm) < len(samples):
            warm_text += f" ({len(warm)} of {len(samples)})"
        lines.append(
            f"| {fs.config.label} | {fs.read_ahead_kb} "
            f"| {' / '.join(f'{m >> 10} KiB' for m in max_reads)} "
            f"| {spread([s.reads for s in samples], 0)} "
            f"| {spread([s.cold_mb_s for s in samples], 0)} "
            f"| {spread([s.cpu_s_per_gb for s in samples], 2)} "
            f"| {warm_text} "
            f"| {spread([s.stat_us for s in samples], 1)} |"
        )
        disturbed = sum(1 for s in samples if s.foreign_drops)
        missed = sum(s.warm_reads for s in samples if not s.foreign_drops)
        if disturbed:
            notes.append(
                f"{fs.config.label}: {disturbed} trial(s) saw another process's drop_caches"
            )
        if missed:
            notes.append(f"{fs.config.label}: {missed} FUSE READs in undisturbed warm re-reads")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def versions() -> str:
    parts = []
    for dist in ("fusepy", "mfusepy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
    for package in ("libfuse2", "libfuse3-3"):
        query = ["dpkg-query", "-W", "-f", "${Version}", package]
        out = subprocess.run(query, capture_output=True, text=True, check=False)
        if out.returncode == 0:
            parts.append(f"{package} {out.stdout.strip()}")
    return ", ".join(parts)


def check_prerequisites(configs: Sequence[Config]) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: it mounts FUSE, writes sysfs and drop_caches")
    if any(c.binding == "fusepy" for c in configs):
        if importlib.util.find_spec("fuse") is None:
            raise BenchError(
                f"fusepy is not installed for {sys.executable}: "
                f"{Path(sys.executable).parent / 'pip'} install fusepy==3.0.1 "
                "(or leave its configs out with --configs mfusepy3,mfusepy3-ra4M)"
            )
        if ctypes.util.find_library("fuse") is None:
            raise BenchError("libfuse2 is missing: apt-get install libfuse2")
    if ctypes.util.find_library("fuse3") is None:
        raise BenchError("libfuse3 is missing: apt-get install fuse3")


def parse_configs(text: str) -> list[Config]:
    by_key = {c.key: c for c in CONFIGS}
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in by_key]
    if unknown or not keys:
        raise BenchError(f"unknown config {unknown or text!r}; choose from {', '.join(by_key)}")
    return [by_key[k] for k in keys]


@contextlib.contextmanager
def watchdog(seconds: float, mounted: dict[str, MountedFS]) -> Iterator[None]:
    """Kill the FS processes after `seconds`: a read blocked on a hung FUSE FS then fails
    with ENOTCONN instead of hanging the benchmark (no signal handler could interrupt it)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        print(f"timeout after {seconds:.0f}s: killing the FS processes", file=sys.stderr)
        for fs in mounted.values():
            with contextlib.suppress(OSError):
                fs.process.kill()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as exc:
        if fired.is_set():
            raise BenchError(f"timed out after {seconds:.0f}s") from exc
        raise
    finally:
        timer.cancel()


def run(args: argparse.Namespace, configs: Sequence[Config], out: IO[str]) -> None:
    size = args.size_mb << 20
    load_before = os.getloadavg()
    mounted: dict[str, MountedFS] = {}
    results = Results()
    with (
        tempfile.TemporaryDirectory(prefix="lzs-bench-fuse-") as base_dir,
        contextlib.ExitStack() as cleanup,
        watchdog(args.timeout, mounted),
    ):
        base = Path(base_dir)
        for config in configs:
            fs = start_fs(config, base, size, args.files)
            mounted[config.key] = fs
            cleanup.callback(fs.stop)
            print(f"started {config.key} pid {fs.process.pid} at {fs.mountpoint}", file=sys.stderr)
        for fs in mounted.values():  # the FS processes generate their data in parallel
            wait_mounted(fs, 2 if fs.config.binding == "fusepy" else 3)
        buffer = bytearray(READ_CHUNK)
        for trial in range(args.trials):
            shift = trial % len(configs)  # a different config goes first in each trial
            for config in [*configs[shift:], *configs[:shift]]:
                _raise_if_interrupted()
                sample = measure(mounted[config.key], size, args.files, buffer)
                results.samples.setdefault(config.key, []).append(sample)
                print(
                    f"trial {trial + 1}/{args.trials} {config.key}: cold "
                    f"{sample.cold_mb_s:.0f} MB/s, max READ {sample.max_read >> 10} KiB",
                    file=sys.stderr,
                )
        ordered = Results({c.key: results.samples[c.key] for c in configs})
        table = report(ordered, mounted, args, load_before)
        if args.json:
            records = {k: [vars(s) for s in v] for k, v in ordered.samples.items()}
            Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    out.write(table + "\n")


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised like KeyboardInterrupt so that it unwinds through the cleanup."""


_received: list[int] = []  # signals received, also when their exception got lost


def _raise_on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def _raise_if_interrupted() -> None:
    """A signal handler runs at whatever bytecode the main thread is at; if that is inside a
    finalizer (__del__ of a file or Popen object, run by the garbage collector), Python prints
    the exception and carries on. The run then checks before each measurement."""
    if _received:
        raise Interrupted(_received[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=256, help="size of /big in MiB")
    parser.add_argument("--files", type=int, default=2000, help="4 KiB files in /d/")
    parser.add_argument(
        "--configs",
        default=",".join(c.key for c in CONFIGS),
        help=f"comma list of {', '.join(c.key for c in CONFIGS)}",
    )
    parser.add_argument("--json", help="also write every sample to this file")
    parser.add_argument("--timeout", type=float, default=600, help="give up after N seconds")
    parser.add_argument("--serve", nargs=2, metavar=("BINDING", "MOUNTPOINT"), help="internal")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve[0], args.serve[1], args.size_mb << 20, args.files)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_on_signal)
    try:
        if args.trials < 1 or args.size_mb < 1 or args.files < 1:
            raise BenchError("--trials, --size-mb and --files must be at least 1")
        configs = parse_configs(args.configs)
        check_prerequisites(configs)
        run(args, configs, sys.stdout)
    except BenchError as exc:
        print(f"bench_fuse_binding: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print("bench_fuse_binding: interrupted; mounts and processes cleaned up", file=sys.stderr)
        return 128 + int(exc.args[0])
    except OSError as exc:
        print(f"bench_fuse_binding: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
