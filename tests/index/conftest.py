"""Layer fixtures for the index tests: real Debian content compressed by real programs.

The tar holds /usr/lib/python3.11 of this machine (~1.5k entries, ~50 MB), written by GNU tar;
gzip'ed by Python's gzip and by pigz, cut into gzip members, and into zstd frames. Built once
per session into a temporary directory that is removed at the end.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from snapshotter.index.build import build_layer_index
from snapshotter.index.model import LayerIndex

SOURCE_DIR = "usr/lib/python3.11"
TEST_SPAN_SIZE = 256 << 10  # small spans: many checkpoints with every `bits` value
TEST_FILE_CUT_MIN = 32 << 10
GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP_MT = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZSTD_MT = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR_MT = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Layer:
    name: str
    blob: bytes
    media_type: str
    tar: bytes  # the uncompressed tar stream

    def build(self, span_size: int = TEST_SPAN_SIZE, file_cut_min: int = 0) -> LayerIndex:
        """file_cut_min 0: cut by size only (zran's rule, what indexed_gzip places)."""
        return build_layer_index(
            OnlyRead(self.blob),
            media_type=self.media_type,
            span_size=span_size,
            file_cut_min=file_cut_min,
        )


class OnlyRead:
    """A stream like an HTTP body: read(n) only (short reads), no seek/tell."""

    def __init__(self, data: bytes, max_chunk: int = 200_003) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._max = max_chunk

    def read(self, n: int = -1) -> bytes:
        n = self._max if n < 0 else min(n, self._max)
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk


def tar_bytes(
    members: Sequence[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def reg(name: str, data: bytes = b"", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    return info, data


def node(name: str, kind: bytes, **kw: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in kw.items():
        setattr(info, key, value)
    return info, None


@pytest.fixture(scope="session")
def layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("index-layers")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_tar(layer_dir: Path) -> bytes:
    target = layer_dir / "layer.tar"
    subprocess.run(
        ["tar", "-C", "/", "--sort=name", "-cf", str(target), SOURCE_DIR],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    return target.read_bytes()


@pytest.fixture(scope="session")
def layers(debian_tar: bytes, layer_dir: Path) -> dict[str, Layer]:
    pigz = subprocess.run(["pigz", "-c"], input=debian_tar, capture_output=True, check=True)
    members = b"".join(
        gzip.compress(debian_tar[i : i + 3_000_000], 6, mtime=0)
        for i in range(0, len(debian_tar), 3_000_000)
    )
    cctx = zstandard.ZstdCompressor(level=3)
    frames = b"".join(
        cctx.compress(debian_tar[i : i + (1 << 20)]) for i in range(0, len(debian_tar), 1 << 20)
    )
    # frames as a streaming writer makes them: no content size, plus skippable metadata frames
    streamer = zstandard.ZstdCompressor(level=1, write_content_size=False)
    skippable = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    unsized = b""
    for i in range(0, len(debian_tar), 700_000):
        frame = streamer.compressobj()
        unsized += frame.compress(debian_tar[i : i + 700_000]) + frame.flush() + skippable
    return {
        "python-gzip": Layer(
            "python-gzip", gzip.compress(debian_tar, 6, mtime=0), GZIP_MT, debian_tar
        ),
        "pigz": Layer("pigz", pigz.stdout, DOCKER_GZIP_MT, debian_tar),
        "multi-member": Layer("multi-member", members, GZIP_MT, debian_tar),
        "tar": Layer("tar", debian_tar, TAR_MT, debian_tar),
        "zstd-frames": Layer("zstd-frames", frames, ZSTD_MT, debian_tar),
        "zstd-unsized": Layer("zstd-unsized", unsized, ZSTD_MT, debian_tar),
    }


@pytest.fixture(scope="session")
def built(layers: dict[str, Layer]) -> dict[str, LayerIndex]:
    """Cut by size only."""
    return {name: layer.build() for name, layer in layers.items()}


@pytest.fixture(scope="session")
def built_file_cuts(layers: dict[str, Layer]) -> dict[str, LayerIndex]:
    """Cut by size and at file starts (test_span_layout.py)."""
    return {name: layer.build(file_cut_min=TEST_FILE_CUT_MIN) for name, layer in layers.items()}
