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

    python -m bench.readdir_listing [--sizes 10,30,100,300,1000,2000]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from snapshotter.fs import fuse_ops
from snapshotter.fs.clock import SYSTEM_CLOCK
from snapshotter.fs.tree import ROOT_INO, Inode, LayerTree

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


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.readdir_listing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", default="10,30,100,300,1000,2000")
    args = parser.parse_args()
    print(
        f"{'entries':>7} {'stock us':>9} {'(list':>7} {'convert':>8} {'filler)':>8}"
        f" {'lean us':>8} {'stock/entry':>11} {'lean/entry':>10}"
        f" {'C thread: stock us':>18} {'lean us':>8}"
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        loop = _c_loop(Path(cache_dir))
        for size in (int(part) for part in args.sizes.split(",")):
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
