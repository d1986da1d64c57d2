"""Layers for the lazy-read stress tests: many small files, a few large ones (one with long zero
runs, one real ELF binary), empty files, hardlinks and a replaced duplicate; compressed the ways
real layers are (pigz, Python's gzip, zstd in frames, plain tar), indexed by the real builder,
and extracted by Python's tarfile as the reference the mounted files are compared with."""

from __future__ import annotations

import gzip
import io
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from snapshotter.index.build import build_layer_index
from snapshotter.index.model import EntryType, LayerIndex

MiB = 1 << 20
MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "pigz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
ZSTD_FRAME = 256 << 10  # one zstd frame per 256 KiB of tar: spans are whole frames
BUSYBOX = Path("/bin/busybox")


def _content(rng: random.Random, size: int) -> bytes:
    """Mixed data: text-like runs (compress well) and random runs (do not), so compressed span
    sizes vary the way they do in real layers."""
    out = bytearray()
    words = [
        bytes(rng.choice(b"abcdefghijklmnop ") for _ in range(rng.randrange(2, 9)))
        for _ in range(64)
    ]
    while len(out) < size:
        if rng.random() < 0.5:
            out += b" ".join(rng.choice(words) for _ in range(rng.randrange(10, 400)))
        else:
            out += rng.randbytes(rng.randrange(100, 8000))
    return bytes(out[:size])


def make_stress_tar(seed: int, *, small_files: int, large_sizes: tuple[int, ...]) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str,
            data: bytes = b"",
            kind: bytes = tarfile.REGTYPE,
            link: str = "",
            mode: int = 0o644,
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else mode
            info.mtime = 1_700_000_000
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        for directory in ("bin", "lib", "usr", "usr/share", "usr/share/data", "big"):
            add(directory, kind=tarfile.DIRTYPE)
        for number in range(small_files):
            # a few empty files, many below a page, some across a 64 KiB boundary
            size = (
                rng.choice((0, 1, 100, 4095, 4096, 4097))
                if number % 7 == 0
                else rng.randrange(0, 40000)
            )
            add(f"usr/share/data/f{number:04d}", _content(rng, size))
        for number, size in enumerate(large_sizes):
            data = _content(rng, size)
            if number == 1:  # long zero runs: a file that is mostly "sparse"
                data = bytes(size // 2) + data[size // 2 : size - MiB] + bytes(min(MiB, size))
                data = data[:size]
            add(f"big/large{number}", data)
        if BUSYBOX.exists():
            add("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)  # executed by the readers
        add("lib/dup", _content(rng, 5000))
        add("lib/dup", _content(rng, 70000))  # the later entry wins, as in extraction
        add("lib/hard-small", kind=tarfile.LNKTYPE, link="usr/share/data/f0003")
        add("lib/hard-large", kind=tarfile.LNKTYPE, link="big/large0")
        add("lib/empty")
        add("lib/tail", _content(rng, 3 * 4096 + 5))
    return buf.getvalue()


def compress(tar: bytes, kind: str) -> bytes:
    if kind == "tar":
        return tar
    if kind == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if kind == "pigz":
        pigz = shutil.which("pigz")
        if pigz is None:
            raise RuntimeError("pigz is not installed (scripts/install-deps.sh)")
        return subprocess.run(
            [pigz, "-c", "-6", "-p", "2"], input=tar, capture_output=True, check=True
        ).stdout
    if kind == "zstd":
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3)
        return b"".join(
            compressor.compress(tar[i : i + ZSTD_FRAME]) for i in range(0, len(tar), ZSTD_FRAME)
        )
    raise ValueError(f"unknown compression {kind!r}")


def index_for(blob: bytes, kind: str, span_size: int) -> LayerIndex:
    return build_layer_index(io.BytesIO(blob), media_type=MEDIA_TYPES[kind], span_size=span_size)


def extract(tar: bytes, where: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        archive.extractall(where, numeric_owner=True, filter="fully_trusted")


@dataclass(frozen=True)
class FileInLayer:
    rel: str
    size: int
    boundaries: tuple[int, ...]  # file offsets where one span ends and the next begins


def regular_files(index: LayerIndex) -> list[FileInLayer]:
    """Every path with data (hardlinks under their own names), with its span boundaries."""
    by_name = {e.name: e for e in index.entries}
    files = []
    for entry in index.entries:
        data = by_name[entry.link_target] if entry.type is EntryType.HARDLINK else entry
        if data.type is not EntryType.REG:
            continue
        edges = tuple(
            span.uncompressed_start - data.offset
            for span in index.spans
            if data.offset < span.uncompressed_start < data.offset + data.size
        )
        files.append(FileInLayer(entry.name, data.size, edges))
    return files
