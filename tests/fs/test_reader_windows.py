"""LayerReader with a version-2 index: span windows read from a windows blob over HTTP."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.mount_process import open_windows_source
from snapshotter.fs.mount_spec import MountSpec, SpecError
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.index.codec import decode_index, encode_index_split
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members

TIMEOUT = 3.0


@dataclass
class SplitLayer:
    tar: bytes
    index: LayerIndex  # version 2, decoded from its index blob
    data: BlobServer  # the layer blob
    windows: BlobServer  # the windows blob

    def reader(self, cache_dir: Path) -> LayerReader:
        return LayerReader(
            self.index,
            UrlBlobSource(self.data.url, timeout=TIMEOUT, digest=self.index.layer_digest),
            SpanCache(cache_dir, 1 << 30),
            fetch_timeout=TIMEOUT,
            windows=UrlBlobSource(self.windows.url, timeout=TIMEOUT),
        )


def _split(alter: Callable[[bytes], bytes] = bytes) -> Iterator[SplitLayer]:
    """The served windows blob is alter(the real one)."""
    tar = make_tar(rich_members())
    blob = compress(tar, "gzip")
    index_blob, windows = encode_index_split(built_index(blob, "gzip"))
    index = decode_index(index_blob)
    assert index.windows is not None and index.windows.size == len(windows)
    data = BlobServer(blob)
    window_server = BlobServer(alter(windows))
    try:
        yield SplitLayer(tar, index, data, window_server)
    finally:
        data.stop()
        window_server.stop()


@pytest.fixture
def layer() -> Iterator[SplitLayer]:
    yield from _split()


def _files(index: LayerIndex) -> list[TocEntry]:
    return [e for e in index.entries if e.type is EntryType.REG and e.size]


def test_every_file_reads_back_exactly(layer: SplitLayer, tmp_path: Path) -> None:
    reader = layer.reader(tmp_path)
    try:
        for entry in _files(layer.index):
            want = layer.tar[entry.offset : entry.offset + entry.size]
            assert reader.read(entry, 0, entry.size + 10) == want, entry.name
        counters = reader.counters()
        assert counters.fetch_errors == 0
        assert counters.spans_fetched == len(layer.index.spans)
        # one windows range per data range that needed windows, never one per span
        assert 0 < len(layer.windows.requests) <= len(layer.data.requests)
        assert len(layer.windows.requests) < sum(1 for s in layer.index.spans if s.window_length)
    finally:
        reader.close()


def test_the_windows_are_fetched_while_the_data_is(layer: SplitLayer, tmp_path: Path) -> None:
    """The windows request does not wait for the data request to finish: no extra round trip."""
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = next(
        n
        for n, s in enumerate(layer.index.spans)
        if s.window_length and s.uncompressed_start >= entry.offset
    )
    span = layer.index.spans[span_no]
    gate = threading.Event()
    layer.data.gates[span.compressed_start] = gate
    reader = layer.reader(tmp_path)
    try:
        result: list[bytes] = []
        offset = span.uncompressed_start - entry.offset
        thread = threading.Thread(target=lambda: result.append(reader.read(entry, offset, 100)))
        thread.start()
        for _ in range(300):  # the data request is held at the gate meanwhile
            if layer.windows.requests:
                break
            threading.Event().wait(0.01)
        assert layer.windows.requests, "the windows were not requested while the data was"
        assert layer.windows.requests[0][0] == span.window_offset
        gate.set()
        thread.join(TIMEOUT * 2)
        want = layer.tar[span.uncompressed_start : span.uncompressed_start + 100]
        assert result == [want]
    finally:
        gate.set()
        reader.close()


def _flip_every_byte(windows: bytes) -> bytes:
    return bytes(b ^ 0x55 for b in windows)


@pytest.fixture
def corrupt() -> Iterator[SplitLayer]:
    yield from _split(_flip_every_byte)


def test_a_corrupt_windows_blob_fails_the_read_naming_it(
    corrupt: SplitLayer, tmp_path: Path
) -> None:
    assert corrupt.index.windows is not None
    reader = corrupt.reader(tmp_path)
    try:
        for entry in _files(corrupt.index):
            spans = corrupt.index.spans
            if not any(
                s.window_length
                and s.uncompressed_start < entry.offset + entry.size
                and s.uncompressed_end > entry.offset
                for s in spans
            ):
                continue
            with pytest.raises(SpanReadError) as failure:
                reader.read(entry, 0, entry.size)
            assert f"windows blob {corrupt.index.windows.digest}" in str(failure.value)
            assert f"layer {corrupt.index.layer_digest} span " in str(failure.value)
            return
        pytest.fail("no file needs a window")
    finally:
        reader.close()


def test_an_unreachable_windows_blob_fails_the_read_naming_it(
    layer: SplitLayer, tmp_path: Path
) -> None:
    assert layer.index.windows is not None
    layer.windows.stop()
    reader = layer.reader(tmp_path)
    try:
        entry = max(_files(layer.index), key=lambda e: e.size)
        with pytest.raises(SpanReadError, match=f"windows blob {layer.index.windows.digest}"):
            reader.read(entry, 0, entry.size)
    finally:
        reader.close()


def test_a_v2_index_needs_a_windows_source(layer: SplitLayer, tmp_path: Path) -> None:
    blob = UrlBlobSource(layer.data.url, timeout=TIMEOUT)
    with pytest.raises(ValueError, match=f"layer {layer.index.layer_digest}: a windows blob"):
        LayerReader(layer.index, blob, SpanCache(tmp_path, 1 << 30))


def test_a_v2_index_needs_a_registry_blob_source(layer: SplitLayer, tmp_path: Path) -> None:
    """The windows blob is found beside the layer blob in its repository: a file or bare URL
    source names none, so the mount fails, naming the layer and the windows blob."""
    assert layer.index.windows is not None
    spec = MountSpec(
        mountpoint=str(tmp_path / "mnt"),
        index_path=str(tmp_path / "index"),
        blob=BlobSpec("file", str(tmp_path / "blob"), layer.index.layer_digest),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 30,
    )
    with pytest.raises(SpecError, match=f"layer {layer.index.layer_digest} keeps its windows"):
        open_windows_source(spec, layer.index)
    registry = dataclasses.replace(
        spec, blob=BlobSpec("registry", "127.0.0.1:1/some/repo", layer.index.layer_digest, 10)
    )
    source = open_windows_source(registry, layer.index)
    assert source is not None and getattr(source, "digest", None) == layer.index.windows.digest


def test_background_fetch_counts_the_window_bytes_it_fetched(
    layer: SplitLayer, tmp_path: Path
) -> None:
    # Background fetch paces itself by the bytes it asked the registry for: the windows too.
    from snapshotter.index.spans import fetch_range

    reader = layer.reader(tmp_path)
    try:
        fetched = sum(reader.fetch_in_background(n) for n in range(len(layer.index.spans)))
        spans = sum(
            e - b for b, e in (fetch_range(layer.index, n) for n in range(len(layer.index.spans)))
        )
        assert layer.index.windows is not None
        assert fetched == spans + layer.index.windows.size
        assert reader.counters().background_bytes == fetched
    finally:
        reader.close()
