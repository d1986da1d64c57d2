"""Layers built in worker processes (indexer/layer_worker.py): the same index as the builder
in this process, refusals that name the problem and keep the worker, broken streams that end
it, and no process left behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path

import pytest

from harness.images import file, layer_tar
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import encode_index_split
from snapshotter.index.errors import InvalidLayer
from snapshotter.indexer.layer_worker import LayerWorkers, pull_from

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SPAN = 1 << 20


def _layer(seed: int) -> bytes:
    # Compressible, varied content (a few spans), as real layers are.
    text = b"".join(hashlib.sha256(b"%d-%d" % (seed, i)).hexdigest().encode() for i in range(40000))
    return gzip.compress(layer_tar([file("data/a.txt", text), file("data/b.txt", text[::-1])]))


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _worker_pids() -> set[int]:
    """This process's children running the layer worker."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"snapshotter.indexer.layer_worker" in cmdline:
            found.add(int(entry.name))
    return found


def _build(
    workers: LayerWorkers,
    blob: bytes,
    stream: io.RawIOBase | None = None,
    *,
    file_cut_min: int = 0,
) -> bytes:
    encoded = workers.build(
        pull_from(stream or io.BytesIO(blob)),
        media_type=GZIP_LAYER,
        span_size=SPAN,
        file_cut_min=file_cut_min,
        digest=_digest(blob),
        size=len(blob),
        progress=lambda n: None,
    )
    return encoded.index_blob + b"|" + encoded.windows_blob


@pytest.mark.parametrize("file_cut_min", [0, 64 << 10])
def test_a_worker_builds_the_same_index_as_the_builder_in_process(file_cut_min: int) -> None:
    blob = _layer(1)
    index = build_layer_index(
        io.BytesIO(blob), media_type=GZIP_LAYER, span_size=SPAN, file_cut_min=file_cut_min
    )
    expected_blob, expected_windows = encode_index_split(index)
    with LayerWorkers() as workers:
        built = _build(workers, blob, file_cut_min=file_cut_min)
        assert built == expected_blob + b"|" + expected_windows
    assert _worker_pids() == set()


def test_a_refused_layer_names_the_problem_and_its_worker_serves_the_next_layer() -> None:
    not_a_tar = gzip.compress(os.urandom(300_000))
    good = _layer(2)
    with LayerWorkers() as workers:
        with pytest.raises(InvalidLayer):
            _build(workers, not_a_tar)
        first = _worker_pids()
        _build(workers, good)
        assert _worker_pids() == first and len(first) == 1
    assert _worker_pids() == set()


class _BreaksOff(io.RawIOBase):
    """A layer body that fails after `after` bytes, as a registry connection can."""

    def __init__(self, data: bytes, after: int) -> None:
        self._data = io.BytesIO(data[:after])

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._data.read(min(size, 65536))
        if not chunk:
            raise ConnectionResetError("the registry went away")
        return chunk


def test_a_stream_that_breaks_off_ends_its_worker_and_the_next_layer_gets_a_new_one() -> None:
    blob = _layer(3)
    with LayerWorkers() as workers:
        with pytest.raises(ConnectionResetError):
            _build(workers, blob, _BreaksOff(blob, len(blob) // 2))
        assert _worker_pids() == set()  # it was inside a request: killed, not reused
        index = build_layer_index(io.BytesIO(blob), media_type=GZIP_LAYER, span_size=SPAN)
        assert _build(workers, blob) == b"|".join(encode_index_split(index))
    assert _worker_pids() == set()
