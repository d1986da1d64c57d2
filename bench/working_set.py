"""Working set of a container start: the bytes a workload really reads, and the compressed
bytes any span-based lazy pull must fetch for them, per span size.

    sudo $PY -m bench.working_set                              # pybig, print(1) + import
    sudo $PY -m bench.working_set --span-sizes 1M,512K,256K,128K --json ws.json
    sudo $PY -m bench.working_set --image /path/to/oci-layout:tag -- cat /etc/passwd

The image (an OCI layout: a name in the test-image cache, LAZYSNAP_TEST_IMAGES, or a path) is
extracted layer by layer, whiteouts and opaque directories applied, into an ext4 file system on
a loop device of the script's own (sparse file in a temp dir), so the loop device's
read_ahead_kb can be set without touching the machine's disks. Per workload: sync, evict every
file's pages (POSIX_FADV_DONTNEED), run the command chrooted in the tree, then mincore() every
regular file -> resident page ranges. Each resident file is mapped to the layer that provides it
(the topmost holding its path) and, through the real indexer's spans, to the compressed bytes
of the spans holding the whole files and of those holding only the resident ranges, plus the
gzip windows those spans need (index format 2's windows blob). The gzip -6 size of the resident
bytes alone is the floor no span-based format beats.

Span layouts (--layouts) compare how the indexer cuts spans: `1M` is span size 1 MiB with cuts by
size only; `1M/f64K` adds file-aware cuts (at each file's data start once the span holds 64 KiB;
gzip cuts at the deflate block boundary at or before it). --reads-from takes the workloads' reads
from an earlier run's --json (same image) and only maps them to the layouts' spans.

Progress goes to stderr, a markdown table to stdout, --json FILE gets the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import zstandard

from harness.images import read_layout
from harness.procs import HarnessError
from snapshotter.fs.read_ahead import directory_data_ends
from snapshotter.fs.tree import META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX, LayerTree
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import decode_index, encode_index_split
from snapshotter.index.errors import IndexFormatError
from snapshotter.index.model import (
    DEFAULT_FILE_CUT_MIN,
    DEFAULT_SPAN_SIZE,
    MAX_SPAN_SIZE,
    MIN_SPAN_SIZE,
    Compression,
    LayerIndex,
)
from snapshotter.index.spans import spans_for_range

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

TEST_IMAGES = Path(os.environ.get("LAZYSNAP_TEST_IMAGES", "/var/cache/lazysnap-test-images"))
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The start-up benchmark's pybig workloads (bench/startup_workloads.py).
DEFAULT_WORKLOADS = (("python3", "-c", "print(1)"), ("python3", "-c", "import numpy, pandas"))
ROOTFS = "rootfs"  # the tree sits below the mount point, away from lost+found
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # held while a child's pid is not yet known


class WorkingSetError(Exception):
    """A failure the user can act on; the message names the thing (image, layer, tool, path)."""


# ---------------------------------------------------------------------------------------------
# image


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int
    blob: Path


@dataclass(frozen=True)
class Image:
    name: str
    layers: tuple[Layer, ...]
    env: tuple[str, ...]
    workdir: str


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise WorkingSetError(f"{what} {path}: {exc}") from None


def load_image(spec: str) -> Image:
    """spec: a name in the test-image cache (`pybig`) or an OCI layout path, either with an
    optional `:tag` (default latest)."""
    location, _, tag = spec.partition(":")
    tag = tag or "latest"
    layout = Path(location) if "/" in location else TEST_IMAGES / location
    if not (layout / "index.json").is_file():
        hint = "" if "/" in location else " (run scripts/build-test-images.sh)"
        raise WorkingSetError(f"image {spec!r}: {layout} is not an OCI layout{hint}")
    try:
        built = read_layout(layout, tag)
    except (HarnessError, OSError, ValueError, KeyError) as exc:
        raise WorkingSetError(f"image {spec!r}: {exc}") from None
    blobs = layout / "blobs" / "sha256"

    def blob(digest: str) -> Path:
        return blobs / digest.split(":", 1)[1]

    config = _read_json(blob(built.config_digest), "image config").get("config") or {}
    layers = tuple(
        Layer(layer.digest, layer.media_type, layer.size, blob(layer.digest))
        for layer in built.layers
    )
    for layer in layers:
        if not layer.blob.is_file():
            raise WorkingSetError(f"image {spec!r}: layer blob {layer.blob} is missing")
    return Image(
        name=spec,
        layers=layers,
        env=tuple(config.get("Env") or [DEFAULT_PATH]),
        workdir=config.get("WorkingDir") or "/",
    )


@dataclass(frozen=True)
class Layout:
    """How the indexer cuts spans: build_layer_index's span_size and file_cut_min."""

    span_size: int
    file_cut_min: int = 0

    @property
    def label(self) -> str:
        size = size_label(self.span_size)
        return f"{size}/f{size_label(self.file_cut_min)}" if self.file_cut_min else size


def index_layers(image: Image, layout: Layout) -> list[LayerIndex]:
    """The real indexer over each local layer blob (what `lazysnap index build` would push)."""
    indexes = []
    for layer in image.layers:
        try:
            with open(layer.blob, "rb") as stream:
                indexes.append(
                    build_layer_index(
                        stream,
                        media_type=layer.media_type,
                        span_size=layout.span_size,
                        file_cut_min=layout.file_cut_min,
                        expected_digest=layer.digest,
                    )
                )
        except (IndexFormatError, OSError) as exc:
            raise WorkingSetError(f"layer {layer.digest}: cannot index it: {exc}") from None
    return indexes


# ---------------------------------------------------------------------------------------------
# scratch file system on a loop device


def _run(argv: Sequence[str], what: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise WorkingSetError(f"{what}: {argv[0]} is not installed") from None
    if result.returncode != 0:
        raise WorkingSetError(f"{what} failed ({' '.join(argv)}): {result.stderr.strip()}")
    return result.stdout


@dataclass
class Scratch:
    """Temp dir + sparse image file + loop device + ext4 mount; close() undoes what was done."""

    work: Path
    device: str = ""
    mounted: bool = False

    @property
    def image_file(self) -> Path:
        return self.work / "fs.img"

    @property
    def mountpoint(self) -> Path:
        return self.work / "mnt"

    @property
    def root(self) -> Path:
        return self.mountpoint / ROOTFS

    def create(self, size: int, read_ahead_kb: int) -> None:
        with open(self.image_file, "wb") as handle:
            handle.truncate(size)  # sparse: costs only what is written
        # No journal and no lazy inode-table init: no background writes during a measurement.
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-i",
                "8192",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(self.image_file),
            ],
            "mkfs.ext4",
        )
        self.device = _run(["losetup", "--find", "--show", str(self.image_file)], "losetup").strip()
        self.mountpoint.mkdir()
        _run(["mount", "-o", "noatime", self.device, str(self.mountpoint)], "mount")
        self.mounted = True
        self.root.mkdir(mode=0o755)
        self.set_read_ahead(read_ahead_kb)

    def set_read_ahead(self, kb: int) -> None:
        sysfs = Path("/sys/block") / Path(self.device).name / "queue" / "read_ahead_kb"
        sysfs.write_text(f"{kb}\n")
        if int(sysfs.read_text()) != kb:
            raise WorkingSetError(f"{sysfs} did not take {kb}")

    def read_ahead_kb(self) -> int:
        return int(
            (Path("/sys/block") / Path(self.device).name / "queue" / "read_ahead_kb").read_text()
        )

    def close(self) -> list[str]:
        """Undo everything; returns the problems (cleanup goes on past each one)."""
        problems: list[str] = []
        if self.mounted:
            for attempt in range(5):
                done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
                if done.returncode == 0:
                    break
                time.sleep(0.2 * (attempt + 1))
            else:
                # Something still holds the tree: detach it now, the kernel frees it later.
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
                problems.append(f"{self.mountpoint} was busy: lazily unmounted")
            self.mounted = False
        if self.device:
            detach = subprocess.run(["losetup", "-d", self.device], capture_output=True, text=True)
            if detach.returncode != 0:
                problems.append(f"losetup -d {self.device}: {detach.stderr.strip()}")
            self.device = ""
        shutil.rmtree(self.work, ignore_errors=True)
        return problems


@contextlib.contextmanager
def scratch_fs(parent: Path | None, size: int, read_ahead_kb: int) -> Iterator[Scratch]:
    scratch = Scratch(Path(tempfile.mkdtemp(prefix="lzs-workingset-", dir=parent)))
    try:
        scratch.create(size, read_ahead_kb)
        yield scratch
    finally:
        for problem in scratch.close():
            progress(f"cleanup: {problem}")


# ---------------------------------------------------------------------------------------------
# extraction (in a chrooted child: absolute symlinks of the image resolve inside the tree)


def _normalise(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _apply_whiteouts(index: LayerIndex) -> None:
    """The layer's `.wh.` entries delete from the layers below, before the layer is written."""
    for entry in index.entries:
        parent, _, base = entry.name.rpartition("/")
        directory = "/" + parent
        if base == OPAQUE_MARKER:
            if os.path.isdir(directory) and not os.path.islink(directory):
                for child in os.listdir(directory):
                    _remove(os.path.join(directory, child))
        elif base.startswith(WHITEOUT_PREFIX) and not base.startswith(META_PREFIX):
            _remove(os.path.join(directory, base[len(WHITEOUT_PREFIX) :]))


def _layer_stream(blob: IO[bytes], compression: Compression) -> tarfile.TarFile:
    if compression is Compression.GZIP:
        return tarfile.open(fileobj=blob, mode="r|gz")
    if compression is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|")
    return tarfile.open(fileobj=blob, mode="r|")


def _extract_layer(blob: IO[bytes], index: LayerIndex) -> None:
    _apply_whiteouts(index)
    with _layer_stream(blob, index.compression) as tar:
        for member in tar:
            name = _normalise(member.name)
            base = name.rpartition("/")[2]
            if not name or base.startswith(WHITEOUT_PREFIX):
                continue
            path = "/" + name
            # A later entry replaces an earlier one (as `tar x` unlinks first), except that a
            # directory over a directory keeps its contents.
            if not (member.isdir() and os.path.isdir(path) and not os.path.islink(path)):
                _remove(path)
            tar.extract(member, "/", numeric_owner=True, filter="fully_trusted")


def extract_image(image: Image, indexes: Sequence[LayerIndex], root: Path) -> None:
    """Layers bottom first into root, in a forked child chrooted there; errors come back
    through a pipe and are raised here."""
    with contextlib.ExitStack() as stack:
        # opened before the chroot
        blobs = [stack.enter_context(open(layer.blob, "rb")) for layer in image.layers]
        _extract_in_child(blobs, indexes, root)


def _extract_in_child(
    blobs: Sequence[IO[bytes]], indexes: Sequence[LayerIndex], root: Path
) -> None:
    read_end, write_end = os.pipe()
    pid = -1
    try:
        # Held until pid is assigned: an interrupt in between would lose the child.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if pid == 0:  # child: never returns
            code = 0
            try:
                os.close(read_end)
                os.chroot(root)
                os.chdir("/")
                for number, (blob, index) in enumerate(zip(blobs, indexes, strict=True)):
                    try:
                        _extract_layer(blob, index)
                    except Exception as exc:
                        raise WorkingSetError(
                            f"layer {number} ({index.layer_digest}): extraction failed: "
                            f"{type(exc).__name__}: {exc}"
                        ) from None
            except BaseException as exc:
                os.write(write_end, str(exc).encode()[:4000])
                code = 1
            os._exit(code)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as pipe:
            read_end = -1
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        pid = -1
        if os.waitstatus_to_exitcode(status) != 0:
            raise WorkingSetError(message or f"extraction exited with status {status}")
    finally:
        if pid > 0:  # interrupted: a child still inside the tree would keep it mounted
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# page cache: eviction and residency


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def regular_files(root: Path) -> list[tuple[str, int]]:
    """(path relative to root, size) of every non-empty regular file, each inode once (a hard
    link's pages are the same pages), symlinks never followed."""
    seen: set[int] = set()
    files: list[tuple[str, int]] = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_size and info.st_ino not in seen:
                seen.add(info.st_ino)
                files.append((os.path.relpath(path, root), info.st_size))
    return files


def evict(root: Path, files: Sequence[tuple[str, int]]) -> None:
    os.sync()  # dirty pages cannot be dropped
    for name, _ in files:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the file whose pages are in the page cache (mincore)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        address = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if address is None or address == _MAP_FAILED:
            raise WorkingSetError(f"mmap {path}: {os.strerror(ctypes.get_errno())}")
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        try:
            if _libc.mincore(address, size, vector) != 0:
                raise WorkingSetError(f"mincore {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    ranges: list[tuple[int, int]] = []
    page = 0
    while page < pages:
        if vector[page] & 1:
            end = page
            while end < pages and vector[end] & 1:
                end += 1
            ranges.append((page * PAGE, min(end * PAGE, size)))
            page = end
        else:
            page += 1
    return ranges


def residency(root: Path, files: Sequence[tuple[str, int]]) -> dict[str, list[tuple[int, int]]]:
    found = {}
    for name, size in files:
        ranges = resident_ranges(root / name, size)
        if ranges:
            found[name] = ranges
    return found


# ---------------------------------------------------------------------------------------------
# workloads


@dataclass
class FileRead:
    path: str
    size: int
    layer: int  # number of the layer providing the file (bottom = 0); -1: no layer has it
    ranges: list[tuple[int, int]]

    @property
    def resident(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass
class SpanFigures:
    spans: int = 0
    compressed_bytes: int = 0
    window_bytes: int = 0
    runs: int = 0  # runs of consecutive spans: a cold reader's requests (one per run, + windows)
    # windows of each run's first span only: what a reader that took a span's window from the
    # span before it (fetched in the same run) would fetch
    run_window_bytes: int = 0


@dataclass
class ReadAroundFigures:
    """A reader that, on a miss, fetches up to budget compressed bytes of spans from the missed
    span on in one request, stopping at a span already fetched and at the end of the scope:
    `file` the missing file's spans, `dir` the spans of the regular files of its directory (in
    the layer), `layer` none; needed spans are visited per file (by path) in offset order."""

    budget: int
    scope: str
    requests: int = 0
    spans: int = 0
    compressed_bytes: int = 0
    window_bytes: int = 0
    # windows of each request's first span only: a reader inflating a request's spans in one
    # go needs no other
    first_window_bytes: int = 0


@dataclass
class LayerSpanFigures:
    layer: int
    digest: str
    whole_files: SpanFigures
    resident_ranges: SpanFigures


@dataclass
class SpanSizeResult:
    span_size: int
    whole_files: SpanFigures
    resident_ranges: SpanFigures
    layers: list[LayerSpanFigures]
    file_cut_min: int = 0
    layout: str = ""
    read_around: list[ReadAroundFigures] = field(default_factory=list)


@dataclass
class WorkloadResult:
    command: list[str]
    seconds: float
    left_resident_after_eviction: int  # bytes the eviction could not drop
    files: list[FileRead]
    gzip6_resident_bytes: int
    by_span_size: list[SpanSizeResult] = field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(f.resident for f in self.files)

    @property
    def whole_file_bytes(self) -> int:
        return sum(f.size for f in self.files)


def run_workload(image: Image, root: Path, command: Sequence[str]) -> float:
    """Run command chrooted in root with the image's Env and WorkingDir, in its own session so
    that an interrupt kills all of it (a process left inside would keep the tree mounted)."""
    env = dict(item.split("=", 1) for item in image.env if "=" in item)
    env.setdefault("HOME", "/root")

    def enter() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.chroot(root)
        os.chdir(image.workdir)

    start = time.perf_counter()
    process: subprocess.Popen[bytes] | None = None
    # An interrupt while Popen waits for the exec would lose the child's pid (and leave it
    # running in the tree): SIGINT/SIGTERM wait until the cleanup below knows the process.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        try:
            process = subprocess.Popen(
                list(command),
                env=env,
                preexec_fn=enter,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise WorkingSetError(f"workload {' '.join(command)!r}: cannot start: {exc}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        out, err = process.communicate()
    finally:
        if process is not None:
            # The whole session: a process it left behind would keep the tree mounted.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.perf_counter() - start
    for line in (out + err).decode(errors="replace").splitlines()[-5:]:
        progress(f"  | {line}")
    if process.returncode != 0:
        raise WorkingSetError(
            f"workload {' '.join(command)!r} exited with {process.returncode}: "
            f"{err.decode(errors='replace').strip()[-500:]}"
        )
    return seconds


def gzip6_size(root: Path, files: Sequence[FileRead]) -> int:
    """gzip -6 of the resident bytes alone, concatenated in path order."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    for read in sorted(files, key=lambda f: f.path):
        with open(root / read.path, "rb") as handle:
            for start, end in read.ranges:
                handle.seek(start)
                total += len(compressor.compress(handle.read(end - start)))
    return total + len(compressor.flush())


def providing_layer(trees: Sequence[LayerTree], path: str) -> int:
    """The topmost layer holding path: the one whose file the merged tree shows (a lower one
    would have been whited out, or replaced, by it)."""
    for number in range(len(trees) - 1, -1, -1):
        if trees[number].lookup(path) is not None:
            return number
    return -1


def measure(
    image: Image,
    root: Path,
    trees: Sequence[LayerTree],
    command: Sequence[str],
    files: Sequence[tuple[str, int]],
) -> WorkloadResult:
    progress(f"workload {' '.join(command)!r}: evicting {len(files)} files")
    evict(root, files)
    left = sum(e - s for r in residency(root, files).values() for s, e in r)
    if left:
        progress(f"  warning: {left / MB:.2f} MB stayed resident after eviction")
    progress("  running it")
    seconds = run_workload(image, root, command)
    resident = residency(root, files)
    sizes = dict(files)
    reads = [
        FileRead(path, sizes[path], providing_layer(trees, path), ranges)
        for path, ranges in sorted(resident.items())
    ]
    result = WorkloadResult(list(command), seconds, left, reads, gzip6_size(root, reads))
    progress(
        f"  {len(reads)} files, {result.resident_bytes / MB:.1f} MB resident of "
        f"{result.whole_file_bytes / MB:.1f} MB whole files, gzip -6 of the resident bytes "
        f"{result.gzip6_resident_bytes / MB:.1f} MB ({seconds:.2f} s)"
    )
    return result


# ---------------------------------------------------------------------------------------------
# files -> spans


@dataclass
class SpanIndexSizes:
    span_size: int
    spans: int
    index_blob_bytes: int
    windows_blob_bytes: int
    file_cut_min: int = 0
    layout: str = ""


def window_lengths(index: LayerIndex) -> tuple[list[int], int, int]:
    """Per span, its window's bytes in the real format-2 windows blob (0 if none); and the
    index and windows blob sizes."""
    index_blob, windows_blob = encode_index_split(index)
    if not windows_blob:
        return [0] * len(index.spans), len(index_blob), 0
    external = decode_index(index_blob, expected_layer_digest=index.layer_digest)
    return [span.window_length for span in external.spans], len(index_blob), len(windows_blob)


def _figures(index: LayerIndex, windows: Sequence[int], spans: set[int]) -> SpanFigures:
    return SpanFigures(
        spans=len(spans),
        compressed_bytes=sum(index.spans[n].compressed_size for n in spans),
        window_bytes=sum(windows[n] for n in spans),
        runs=sum(1 for n in spans if n - 1 not in spans),
        run_window_bytes=sum(windows[n] for n in spans if n - 1 not in spans),
    )


def _add(total: SpanFigures, part: SpanFigures) -> None:
    total.spans += part.spans
    total.compressed_bytes += part.compressed_bytes
    total.window_bytes += part.window_bytes
    total.runs += part.runs
    total.run_window_bytes += part.run_window_bytes


READ_AROUND_SCOPES = ("file", "dir", "layer")


def read_around(
    indexes: Sequence[LayerIndex],
    trees: Sequence[LayerTree],
    windows: Sequence[Sequence[int]],
    files: Sequence[FileRead],
    budget: int,
    scope: str,
) -> ReadAroundFigures:
    """The requests and bytes of a reader that reads around each miss (see ReadAroundFigures);
    budget 0: one request per missed span."""
    figures = ReadAroundFigures(budget, scope)
    for number, (index, tree) in enumerate(zip(indexes, trees, strict=True)):
        fetched: set[int] = set()
        directory_ends = directory_data_ends(index)
        for read in files:
            if read.layer != number:
                continue
            node = tree.lookup(read.path)
            if node is None or node.data is None or not node.data.size:
                continue
            offset = node.data.offset
            extent = spans_for_range(index, offset, offset + node.data.size)
            needed: set[int] = set()
            for start, end in read.ranges:
                needed.update(spans_for_range(index, offset + start, offset + end))
            stop = {
                "file": extent.stop,
                "dir": spans_for_range(
                    index, offset, directory_ends.get(os.path.dirname(read.path), 0)
                ).stop,
                "layer": len(index.spans),
            }[scope]
            stop = max(stop, extent.stop)
            for span in sorted(needed):
                if span in fetched:
                    continue
                figures.requests += 1
                figures.first_window_bytes += windows[number][span]
                taken = 0
                for more in range(span, stop):
                    size = index.spans[more].compressed_size
                    if more in fetched or (more != span and taken + size > budget):
                        break
                    fetched.add(more)
                    taken += size
                    figures.spans += 1
                    figures.compressed_bytes += size
                    figures.window_bytes += windows[number][more]
    return figures


def map_to_spans(
    indexes: Sequence[LayerIndex],
    trees: Sequence[LayerTree],
    windows: Sequence[Sequence[int]],
    files: Sequence[FileRead],
    layout: Layout,
    budgets: Sequence[int] = (),
) -> SpanSizeResult:
    whole_total, ranges_total = SpanFigures(), SpanFigures()
    layers = []
    for number, (index, tree) in enumerate(zip(indexes, trees, strict=True)):
        whole: set[int] = set()
        ranged: set[int] = set()
        for read in files:
            if read.layer != number:
                continue
            node = tree.lookup(read.path)
            if node is None or node.data is None or not node.data.size:
                continue
            offset = node.data.offset
            whole.update(spans_for_range(index, offset, offset + node.data.size))
            for start, end in read.ranges:
                ranged.update(spans_for_range(index, offset + start, offset + end))
        part = LayerSpanFigures(
            number,
            index.layer_digest,
            _figures(index, windows[number], whole),
            _figures(index, windows[number], ranged),
        )
        _add(whole_total, part.whole_files)
        _add(ranges_total, part.resident_ranges)
        layers.append(part)
    return SpanSizeResult(
        layout.span_size,
        whole_total,
        ranges_total,
        layers,
        layout.file_cut_min,
        layout.label,
        [
            read_around(indexes, trees, windows, files, budget, scope)
            for scope in READ_AROUND_SCOPES
            for budget in budgets
        ],
    )


# ---------------------------------------------------------------------------------------------
# report


def _mb(value: int) -> str:
    return f"{value / MB:.1f}"


def size_label(size: int) -> str:
    return f"{size >> 20}M" if size % (1 << 20) == 0 else f"{size >> 10}K"


def markdown(
    image: Image,
    read_ahead_kb: int,
    index_sizes: Sequence[SpanIndexSizes],
    results: Sequence[WorkloadResult],
) -> str:
    compressed = sum(layer.size for layer in image.layers)
    lines = [
        f"Image {image.name}: {len(image.layers)} layers, {_mb(compressed)} MB compressed; "
        f"loop device read_ahead_kb {read_ahead_kb}. MB = 10^6 bytes. Layout `1M`: 1 MiB spans "
        "cut by size; `1M/f64K`: plus file-aware cuts once a span holds 64 KiB.",
        "",
        "| workload | files read | resident MB | whole-file MB | gzip -6 of resident MB |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        command = " ".join(result.command).replace("|", "\\|")
        lines.append(
            f"| `{command}` | {len(result.files)} | {_mb(result.resident_bytes)} | "
            f"{_mb(result.whole_file_bytes)} | {_mb(result.gzip6_resident_bytes)} |"
        )
    lines += [
        "",
        "| layout | spans | index blobs MB | windows blobs MB |",
        "|---|---|---|---|",
    ]
    for sizes in index_sizes:
        lines.append(
            f"| {sizes.layout} | {sizes.spans} | {sizes.index_blob_bytes / MB:.2f}"
            f" | {_mb(sizes.windows_blob_bytes)} |"
        )
    blobs = {sizes.layout: sizes.index_blob_bytes for sizes in index_sizes}
    lines += [
        "",
        "| workload | layout | whole files: spans (runs) | MB + windows MB | resident ranges: "
        "spans (runs) | MB + windows MB | index blobs + resident ranges' spans + windows MB | "
        "same, windows of each run's first span only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        command = " ".join(result.command).replace("|", "\\|")
        for by_size in result.by_span_size:
            whole, ranged = by_size.whole_files, by_size.resident_ranges
            fetched = blobs.get(by_size.layout, 0) + ranged.compressed_bytes + ranged.window_bytes
            lines.append(
                f"| `{command}` | {by_size.layout} | {whole.spans} ({whole.runs}) | "
                f"{_mb(whole.compressed_bytes)} + {_mb(whole.window_bytes)} | "
                f"{ranged.spans} ({ranged.runs}) | "
                f"{_mb(ranged.compressed_bytes)} + {_mb(ranged.window_bytes)} | "
                f"**{_mb(fetched)}** | "
                f"{_mb(fetched - ranged.window_bytes + ranged.run_window_bytes)} |"
            )
    if any(by_size.read_around for result in results for by_size in result.by_span_size):
        lines += [
            "",
            "Read-around: on a miss, up to BUDGET compressed bytes of spans from the missed span "
            "on in one request (budget 0: one request per missed span), within the file, its "
            "directory or the layer; fetched adds the index blobs; the last column has the "
            "windows of each request's first span only.",
            "",
            "| workload | layout | scope | budget | requests | spans | MB: spans + windows | "
            "**fetched MB** | fetched MB, first windows only |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for result in results:
            command = " ".join(result.command).replace("|", "\\|")
            for by_size in result.by_span_size:
                for around in by_size.read_around:
                    fetched = (
                        blobs.get(by_size.layout, 0) + around.compressed_bytes + around.window_bytes
                    )
                    budget = size_label(around.budget) if around.budget else "0"
                    first_only = fetched - around.window_bytes + around.first_window_bytes
                    lines.append(
                        f"| `{command}` | {by_size.layout} | {around.scope} | {budget} | "
                        f"{around.requests} | {around.spans} | {_mb(around.compressed_bytes)} + "
                        f"{_mb(around.window_bytes)} | **{_mb(fetched)}** | {_mb(first_only)} |"
                    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main


def progress(message: str) -> None:
    print(f"working_set: {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1M or 256K") from None


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("no span size given")
    for size in sizes:
        if not MIN_SPAN_SIZE <= size <= MAX_SPAN_SIZE:
            raise argparse.ArgumentTypeError(
                f"span size {size} is outside the indexer's [{size_label(MIN_SPAN_SIZE)}, "
                f"{size_label(MAX_SPAN_SIZE)}]"
            )
    return sizes


def parse_layouts(text: str) -> list[Layout]:
    """`1M,256K/f64K`: span size, optionally /f<file cut minimum>."""
    layouts = []
    for part in text.split(","):
        if not part.strip():
            continue
        size, _, cut = part.strip().partition("/")
        if cut and not cut.lower().startswith("f"):
            raise argparse.ArgumentTypeError(f"layout {part!r}: expected SIZE or SIZE/fMIN")
        [span_size] = parse_sizes(size)
        file_cut_min = parse_size(cut[1:]) if cut else 0
        if file_cut_min < 0 or file_cut_min > span_size:
            raise argparse.ArgumentTypeError(
                f"layout {part!r}: the file cut minimum must be between 0 and the span size"
            )
        layouts.append(Layout(span_size, file_cut_min))
    if not layouts:
        raise argparse.ArgumentTypeError("no layout given")
    return layouts


def _parse_budgets(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


DEFAULT_LAYOUTS = "1M,256K," + Layout(DEFAULT_SPAN_SIZE, DEFAULT_FILE_CUT_MIN or 64 << 10).label


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.working_set",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--image",
        default="pybig",
        help="a name in the test-image cache or an OCI layout path, optionally "
        ":tag (default: pybig)",
    )
    parser.add_argument(
        "--span-sizes",
        type=parse_sizes,
        default=None,
        help="comma-separated span sizes, cut by size only (short for --layouts)",
    )
    parser.add_argument(
        "--layouts",
        type=parse_layouts,
        default=None,
        help="comma-separated span layouts: SIZE (cut by size) or SIZE/fMIN (plus file-aware "
        f"cuts once a span holds MIN bytes) (default: {DEFAULT_LAYOUTS})",
    )
    parser.add_argument(
        "--reads-from",
        type=Path,
        default=None,
        help="take the workloads' reads from this earlier --json of the same image instead of "
        "running them (no extraction, no root needed)",
    )
    parser.add_argument(
        "--read-ahead-kb",
        type=int,
        default=128,
        help="the loop device's read_ahead_kb (default: 128)",
    )
    parser.add_argument(
        "--read-around",
        type=_parse_budgets,
        default=[],
        help="comma-separated byte budgets (e.g. 0,256K,1M): also model a reader that on a "
        "miss fetches up to BUDGET compressed bytes of that file's spans in one request",
    )
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the temp dir with the sparse file system goes (default: the system temp dir)",
    )
    parser.add_argument(
        "command",
        nargs="*",
        help="after --: the workload (default: python3 -c 'print(1)' and "
        "python3 -c 'import numpy, pandas')",
    )
    args = parser.parse_args(argv)
    if args.span_sizes is not None and args.layouts is not None:
        parser.error("give --span-sizes or --layouts, not both")
    if args.reads_from is not None and args.command:
        parser.error("--reads-from takes the workloads from the file: no command")
    if args.read_ahead_kb < 0:
        parser.error("--read-ahead-kb must be 0 or more")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: directory {args.json.parent} does not exist")
    return args


def load_reads(path: Path, image: Image) -> tuple[list[WorkloadResult], int]:
    """The workloads (with their reads) and read_ahead_kb of an earlier --json of image."""
    raw = _read_json(path, "--reads-from")
    try:
        digests = [layer["digest"] for layer in raw["layers"]]
        if digests != [layer.digest for layer in image.layers]:
            raise WorkingSetError(
                f"--reads-from {path}: measured on other layers than {image.name}"
            )
        results = [
            WorkloadResult(
                list(workload["command"]),
                float(workload["seconds"]),
                int(workload["left_resident_after_eviction"]),
                [
                    FileRead(
                        read["path"],
                        read["size"],
                        read["layer"],
                        [(a, b) for a, b in read["ranges"]],
                    )
                    for read in workload["files"]
                ],
                int(workload["gzip6_resident_bytes"]),
            )
            for workload in raw["workloads"]
        ]
        return results, int(raw["read_ahead_kb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkingSetError(f"--reads-from {path}: not a working_set --json: {exc!r}") from None


def run_workloads(
    args: argparse.Namespace, image: Image, layout: Layout
) -> tuple[list[WorkloadResult], int]:
    """Extract the image onto the scratch file system and measure each workload there."""
    commands = [tuple(args.command)] if args.command else list(DEFAULT_WORKLOADS)
    progress(f"indexing the {len(image.layers)} layer(s) of {image.name} ({layout.label})")
    indexes = index_layers(image, layout)
    uncompressed = sum(index.uncompressed_size for index in indexes)
    # Room for the tree plus ext4's own metadata; the file is sparse.
    fs_size = int(uncompressed * 1.3) + (256 << 20)
    results: list[WorkloadResult] = []
    with scratch_fs(args.work_dir, fs_size, args.read_ahead_kb) as scratch:
        progress(f"extracting into {scratch.root} ({scratch.device}, {uncompressed / MB:.0f} MB)")
        extract_image(image, indexes, scratch.root)
        trees = [LayerTree.from_index(index) for index in indexes]
        files = regular_files(scratch.root)
        read_ahead_kb = scratch.read_ahead_kb()
        for command in commands:
            results.append(measure(image, scratch.root, trees, command, files))
        # Figures of the resident bytes' gzip floor were read above; the tree can go now.
    return results, read_ahead_kb


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    image = load_image(args.image)
    layouts: list[Layout] = (
        args.layouts
        or [Layout(size) for size in (args.span_sizes or [])]
        or parse_layouts(DEFAULT_LAYOUTS)
    )
    if args.reads_from is not None:
        results, read_ahead_kb = load_reads(args.reads_from, image)
    else:
        results, read_ahead_kb = run_workloads(args, image, layouts[0])
    index_sizes: list[SpanIndexSizes] = []
    for layout in layouts:
        progress(f"indexing with layout {layout.label}")
        indexes = index_layers(image, layout)
        trees = [LayerTree.from_index(index) for index in indexes]
        measured = [window_lengths(index) for index in indexes]
        index_sizes.append(
            SpanIndexSizes(
                layout.span_size,
                sum(len(index.spans) for index in indexes),
                sum(m[1] for m in measured),
                sum(m[2] for m in measured),
                layout.file_cut_min,
                layout.label,
            )
        )
        windows = [m[0] for m in measured]
        for result in results:
            result.by_span_size.append(
                map_to_spans(indexes, trees, windows, result.files, layout, args.read_around)
            )
        del indexes, trees  # one layout's indexes (windows inline) in memory at a time
    raw = {
        "image": image.name,
        "layers": [asdict(layer) | {"blob": str(layer.blob)} for layer in image.layers],
        "read_ahead_kb": read_ahead_kb,
        "index_sizes": [asdict(sizes) for sizes in index_sizes],
        "workloads": [
            asdict(result)
            | {"resident_bytes": result.resident_bytes, "whole_file_bytes": result.whole_file_bytes}
            for result in results
        ],
    }
    return markdown(image, read_ahead_kb, index_sizes, results), raw


class _Terminated(Exception):
    pass


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0 and args.reads_from is None:
        print(
            "working_set: needs root (loop device, mount, chroot): run it with sudo",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Even when started with SIGINT ignored (a background job of a script): Ctrl-C cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        table, raw = run(args)
    except WorkingSetError as exc:
        print(f"working_set: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("working_set: interrupted (cleaned up)", file=sys.stderr)
        return 130
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        try:
            tmp.write_text(json.dumps(raw, indent=1) + "\n")
            tmp.rename(args.json)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            print(f"working_set: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
