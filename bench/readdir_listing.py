"""In-process cost of one directory listing on the Python side of a lazy layer's mount.

A warm `import numpy, pandas` still sends every directory listing to the mount processes (the
kernel cannot cache them, see snapshotter/fs/fuse_ops.py). This times what Python does for one
READDIR(PLUS) request, without a mount: mfusepy's own readdir (our list of entries, then its
per-entry copy into a c_stat and the filler call) against the mount's _LayerFUSE.readdir_fuse_3,
for synthetic directories of a given size. libfuse's filler is replaced by a C function that
returns 0 at once (libc's abs), so what is timed is Python and ctypes, not libfuse's copy.

The "C thread" columns call the readdir callback as libfuse does: through the ctypes callback
mfusepy registers, from a thread Python did not start (a small C loop, built with `cc` when there
is one). That adds what every FUSE request pays to enter Python there.

With --mount (as root), the same sizes through a real lazy mount instead: a tar layer of one
directory per size, served over HTTP, mounted as the daemon mounts it; each listing is an
os.listdir (OPENDIR, READDIRPLUS, READDIR, RELEASEDIR). Code from PYTHONPATH, for A/B runs.

    python -m bench.readdir_listing [--sizes 10,30,100,300,1000,2000] [--mount]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness.url_blob import served_blob_spec
from snapshotter.fs import fuse_ops
from snapshotter.fs.clock import SYSTEM_CLOCK
from snapshotter.fs.tree import ROOT_INO, Inode, LayerTree
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import encode_index
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings

DIRECTORY = "/pkg"
# Calls a readdir callback `count` times from a new thread, with a filler that returns 0.
_C_LOOP = r"""
#include <pthread.h>
typedef int (*filler_t)(void *, const char *, const void *, long, int);
typedef int (*readdir_t)(const char *, void *, filler_t, long, void *, int);
struct job { readdir_t readdir; const char *path; void *fi; int count; };
static int fill(void *b, const char *n, const void *s, long o, int f) { return 0; }
static void *run(void *arg) {
    struct job *j = arg;
    for (int i = 0; i < j->count; i++) j->readdir(j->path, 0, fill, 0, j->fi, 0);
    return 0;
}
int listings_in_thread(readdir_t readdir, const char *path, void *fi, int count) {
    struct job j = {readdir, path, fi, count};
    pthread_t t;
    pthread_create(&t, 0, run, &j);
    return pthread_join(t, 0);
}
"""


def _tree(size: int) -> LayerTree:
    """A root with one directory of `size` entries: one in ten a directory, the rest files."""
    root = Inode(ino=ROOT_INO, mode=stat.S_IFDIR | 0o755)
    directory = Inode(ino=ROOT_INO + 1, mode=stat.S_IFDIR | 0o755)
    root.children[DIRECTORY.lstrip("/")] = directory
    by_ino = {root.ino: root, directory.ino: directory}
    for i in range(size):
        kind = stat.S_IFDIR | 0o755 if i % 10 == 0 else stat.S_IFREG | 0o644
        child = Inode(ino=directory.ino + 1 + i, mode=kind)
        directory.children[f"module_{i:05d}.cpython-311.pyc"] = child
        by_ino[child.ino] = child
    return LayerTree(root, by_ino, len(by_ino))


def _operations(tree: LayerTree, cache_dir: str) -> fuse_ops.LayerOperations:
    # Listings touch only the tree and the busy meter (which needs the cache directory).
    reader: Any = SimpleNamespace(cache=SimpleNamespace(directory=cache_dir), clock=SYSTEM_CLOCK)
    return fuse_ops.LayerOperations(tree, reader)


def _unmounted(cls: type[Any], operations: fuse_ops.LayerOperations) -> Any:
    """An mfusepy FUSE object that can serve calls without mounting (its __init__ mounts)."""
    fuse = object.__new__(cls)
    fuse.operations, fuse.encoding, fuse.errors = operations, "utf-8", "surrogateescape"
    return fuse


def _best_us(call: Callable[[], object], repeats: int, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        times.append((time.perf_counter() - start) / repeats)
    return min(times) * 1e6


def _c_loop(work: Path) -> Any | None:
    compiler = shutil.which("cc")
    if compiler is None:
        return None
    (work / "loop.c").write_text(_C_LOOP)
    library = work / "libloop.so"
    command = [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(work / "loop.c")]
    subprocess.run([*command, "-lpthread"], check=True)
    return ctypes.CDLL(str(library))


def _from_c_thread(loop: Any, fuse: Any, file_info: Any, repeats: int) -> float:
    """Microseconds per listing, called the way libfuse calls it (see the module doc)."""
    mfusepy: Any = vars(fuse_ops)["mfusepy"]  # the binding as fuse_ops loaded it (libfuse3)
    fuse._FUSE__critical_exception = None  # FUSE.__init__ sets it; _wrapper reads it
    prototype = dict(mfusepy.fuse_operations._fields_)["readdir"]
    callback = prototype(functools.partial(fuse._wrapper, fuse.readdir_fuse_3))
    path = DIRECTORY.encode()
    return (
        _best_us(lambda: loop.listings_in_thread(callback, path, file_info, repeats), 1) / repeats
    )


def measure(size: int, cache_dir: str, loop: Any | None) -> dict[str, float]:
    mfusepy: Any = vars(fuse_ops)["mfusepy"]  # the binding as fuse_ops loaded it (libfuse3)
    libc = ctypes.CDLL(None)
    filler = mfusepy.fuse_fill_dir_t(ctypes.cast(libc.abs, ctypes.c_void_p).value)
    file_info = ctypes.pointer(mfusepy.fuse_file_info())
    operations = _operations(_tree(size), cache_dir)
    stock = _unmounted(mfusepy.FUSE, operations)
    lean = _unmounted(fuse_ops._LayerFUSE, operations)
    path = DIRECTORY.encode()
    names = [name.encode() for name, _, _ in operations.readdir(DIRECTORY, 0)]
    attributes = mfusepy.c_stat()

    def filler_calls() -> None:
        for name in names:
            filler(None, name, attributes, 0, 0)

    repeats = max(20, 20000 // (size + 2))
    got = {
        "stock": _best_us(
            lambda: stock.readdir_fuse_3(path, None, filler, 0, file_info, 0), repeats
        ),
        "stock_list": _best_us(lambda: operations.readdir(DIRECTORY, 0), repeats),
        "filler_calls": _best_us(filler_calls, repeats),
        "lean": _best_us(lambda: lean.readdir_fuse_3(path, None, filler, 0, file_info, 0), repeats),
    }
    if loop is not None:
        got["stock_c"] = _from_c_thread(loop, stock, file_info, repeats)
        got["lean_c"] = _from_c_thread(loop, lean, file_info, repeats)
    return got


TAR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
MOUNT_LISTINGS = 500  # per timing; the best of 5 timings is kept


def _layer_tar(sizes: list[int]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for size in sizes:
            archive.addfile(_dir_info(f"d{size}"))
            for i in range(size):
                archive.addfile(tarfile.TarInfo(f"d{size}/module_{i:05d}.py"), io.BytesIO(b""))
    return out.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@contextmanager
def _served(blob: bytes) -> Iterator[str]:
    """The blob over HTTP with Range, at any path; yields the server's URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            first, _, last = self.headers.get("Range", "").removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last), len(blob) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(blob)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(blob[start : end + 1])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/blob"
    finally:
        server.shutdown()
        server.server_close()


def measure_mounted(sizes: list[int], work: Path) -> dict[int, float]:
    """Microseconds per os.listdir of each size's directory through a lazy mount."""
    tar = _layer_tar(sizes)
    index = build_layer_index(io.BytesIO(tar), media_type=TAR_MEDIA_TYPE)
    layers = LazyLayers(LazyLayerSettings(str(work / "cache"), 1 << 30, ready_timeout=30))
    mountpoint = work / "layer"
    mountpoint.mkdir()
    with _served(tar) as url:
        spec = LayerSpec(
            blob=served_blob_spec(url, index.layer_digest, len(tar)),
            index_bytes=encode_index(index),
            diff_id="sha256:" + hashlib.sha256(tar).hexdigest(),
        )
        layers.mount_layer(str(mountpoint), spec)
        try:
            got = {}
            for size in sizes:
                directory = str(mountpoint / f"d{size}")
                assert len(os.listdir(directory)) == size, directory
                timed = _best_us(lambda: os.listdir(directory), MOUNT_LISTINGS, rounds=5)  # noqa: B023
                got[size] = timed
            return got
        finally:
            layers.unmount(str(mountpoint))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.readdir_listing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", default="10,30,100,300,1000,2000")
    parser.add_argument("--mount", action="store_true", help="through a real mount (root)")
    args = parser.parse_args()
    sizes = [int(part) for part in args.sizes.split(",")]
    if args.mount:
        with tempfile.TemporaryDirectory() as work:
            for size, timed in measure_mounted(sizes, Path(work)).items():
                print(f"{size:7d} entries: {timed:8.1f} us per listing through the mount")
        return
    print(
        f"{'entries':>7} {'stock us':>9} {'(list':>7} {'convert':>8} {'filler)':>8}"
        f" {'lean us':>8} {'stock/entry':>11} {'lean/entry':>10}"
        f" {'C thread: stock us':>18} {'lean us':>8}"
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        loop = _c_loop(Path(cache_dir))
        for size in sizes:
            got = measure(size, cache_dir, loop)
            convert = got["stock"] - got["stock_list"] - got["filler_calls"]
            count = size + 2  # '.' and '..'
            print(
                f"{size:7d} {got['stock']:9.1f} {got['stock_list']:7.1f} {convert:8.1f}"
                f" {got['filler_calls']:8.1f} {got['lean']:8.1f}"
                f" {got['stock'] / count:11.2f} {got['lean'] / count:10.2f}"
                f" {got.get('stock_c', float('nan')):18.1f} {got.get('lean_c', float('nan')):8.1f}"
            )


if __name__ == "__main__":
    main()
