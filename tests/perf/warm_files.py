"""Micro-benchmark: warm stat/open/read/readlink of many small files on a lazy mount, against
the same tree extracted on local disk (and through an overlay over each, as a container sees it).

    sudo /opt/lazysnap-venv/bin/python -m tests.perf.warm_files [--files 1000] [--passes 5]

Mounts a generated uncompressed layer with the real mount process (served from a local HTTP
server, so only the first pass fetches), reads everything once, then times warm passes. Prints
microseconds per file (median over passes) for each tree. Everything it mounts, starts and
writes is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from tests.fs.fs_helpers import Member, built_index, make_tar
from tests.fs.test_fs_mount import Layer


def members(count: int) -> list[Member]:
    files = [
        Member(f"lib/pkg{n % 20}/mod{n}.py", data=(b"x = %d\n" % n) * (1 + n % 300))
        for n in range(count)
    ]
    links = [
        Member(f"bin/link{n}", tarfile.SYMTYPE, linkname=f"../lib/pkg0/mod{n}.py", mode=0o777)
        for n in range(0, count, 20)
    ]
    return files + links


def one_pass(root: Path, names: list[str], links: list[str]) -> float:
    started = time.perf_counter()
    for name in names:
        path = os.path.join(root, name)
        os.stat(path)
        fd = os.open(path, os.O_RDONLY)
        while os.read(fd, 65536):
            pass
        os.close(fd)
    for name in links:
        os.readlink(os.path.join(root, name))
    return (time.perf_counter() - started) / (len(names) + len(links)) * 1e6


def overlay(lower: Path, work: Path) -> Path:
    for sub in ("upper", "work", "merged"):
        (work / sub).mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(work / "merged")])
    return work / "merged"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    entries = members(args.files)
    tar = make_tar(entries)
    names = [m.name for m in entries if m.kind == tarfile.REGTYPE]
    links = [m.name for m in entries if m.kind == tarfile.SYMTYPE]
    with tempfile.TemporaryDirectory(prefix="lazysnap-warm-") as tmp_dir:
        tmp = Path(tmp_dir)
        local = tmp / "local"
        local.mkdir()
        subprocess.run(["tar", "-x", "-C", str(local)], input=tar, check=True)
        layer = Layer(tar, tar, built_index(tar, "tar"))
        lazy = LazyLayers(LazyLayerSettings(str(tmp / "cache"), 1 << 30))
        mounted = tmp / "lazy"
        mounted.mkdir()
        lazy.mount_layer(str(mounted), layer.spec())
        overlays: list[Path] = []
        try:
            trees = {"local": local, "lazy": mounted}
            for label, lower in list(trees.items()):
                overlays.append(overlay(lower, tmp / f"ovl-{label}"))
                trees[f"overlay on {label}"] = overlays[-1]
            print(f"{len(names)} files + {len(links)} symlinks, {args.passes} warm passes")
            for label, root in trees.items():
                cold = one_pass(root, names, links)
                warm = [one_pass(root, names, links) for _ in range(args.passes)]
                print(
                    f"{label:>18}: first pass {cold:7.1f} us/file, warm median "
                    f"{statistics.median(warm):6.1f} us/file (min {min(warm):.1f})"
                )
        finally:
            for point in overlays:
                subprocess.run(["umount", str(point)], check=False)
            lazy.unmount(str(mounted))
            layer.server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
