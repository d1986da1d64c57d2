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
from snapshotter.fs.cache import HEADER_SIZE, SpanCache
from snapshotter.fs.mount_process import open_windows_source
from snapshotter.fs.mount_spec import MountSpec, SpecError
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.index.codec import decode_index, encode_index_split
from snapshotter.index.errors import SpanVerificationError
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import inflate_span
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
        # front to back, every span's window is the tail of the span before it, which is
        # cached or inflated just before: nothing comes from the windows blob
        assert layer.windows.requests == []
    finally:
        reader.close()


def test_every_file_reads_back_exactly_back_to_front(layer: SplitLayer, tmp_path: Path) -> None:
    # the span before is never held: each read takes its first span's window from the blob
    reader = layer.reader(tmp_path)
    try:
        for entry in reversed(_files(layer.index)):
            want = layer.tar[entry.offset : entry.offset + entry.size]
            assert reader.read(entry, 0, entry.size + 10) == want, entry.name
        assert reader.counters().fetch_errors == 0
        # one windows request per data request at most: a group's first span only
        assert 0 < len(layer.windows.requests) <= len(layer.data.requests)
        for first, last in layer.windows.requests:
            assert any(
                (s.window_offset, s.window_offset + s.window_length - 1) == (first, last)
                for s in layer.index.spans
            ), "a windows request for more than one span's window"
    finally:
        reader.close()


def _windowed_span_in(index: LayerIndex, entry: TocEntry) -> int:
    """A span that needs a window, starts inside entry's data, and whose predecessor holds
    entry's bytes too."""
    return next(
        n
        for n, s in enumerate(index.spans)
        if s.window_length and entry.offset < s.uncompressed_start < entry.offset + entry.size
    )


def test_a_span_after_its_cached_predecessor_fetches_no_window(
    layer: SplitLayer, tmp_path: Path
) -> None:
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = _window_dependent_span(layer, entry)  # so a wrong window would show
    span, before = layer.index.spans[span_no], layer.index.spans[span_no - 1]
    reader = layer.reader(tmp_path / "cache")
    try:
        # the span before, alone (the read stays inside it: no read-ahead)
        tail = layer.tar[before.uncompressed_end - 100 : before.uncompressed_end]
        assert reader.read(entry, before.uncompressed_end - entry.offset - 100, 100) == tail
        windows_before = list(layer.windows.requests)
        assert reader.is_cached(span_no - 1) and not reader.is_cached(span_no)
        got = reader.read(entry, span.uncompressed_start - entry.offset, 100)
        assert got == layer.tar[span.uncompressed_start : span.uncompressed_start + 100]
        assert layer.windows.requests == windows_before  # no windows blob request
    finally:
        reader.close()
    # a fresh reader of the same cache (another mount process) takes it from there too
    after = layer.index.spans[span_no + 1]
    assert after.window_length
    holder = next(
        e for e in _files(layer.index) if e.offset <= after.uncompressed_start < e.offset + e.size
    )
    other = layer.reader(tmp_path / "cache")
    try:
        got = other.read(holder, after.uncompressed_start - holder.offset, 100)
        assert got == layer.tar[after.uncompressed_start : after.uncompressed_start + 100]
        assert layer.windows.requests == windows_before
    finally:
        other.close()


def test_a_span_without_its_predecessor_fetches_its_own_window(
    layer: SplitLayer, tmp_path: Path
) -> None:
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = _windowed_span_in(layer.index, entry)
    span = layer.index.spans[span_no]
    reader = layer.reader(tmp_path)
    try:
        got = reader.read(entry, span.uncompressed_start - entry.offset, 100)
        assert got == layer.tar[span.uncompressed_start : span.uncompressed_start + 100]
        want = (span.window_offset, span.window_offset + span.window_length - 1)
        assert layer.windows.requests == [want]
    finally:
        reader.close()


def _window_dependent_span(layer: SplitLayer, entry: TocEntry) -> int:
    """A span inside entry's data whose bytes depend on its window (back-references into
    it): a wrong window fails its digest. Random data compresses to none."""
    for n, span in enumerate(layer.index.spans):
        if (
            span.window_length
            and entry.offset < span.uncompressed_start < entry.offset + entry.size
        ):
            compressed = layer.data.blob[span.compressed_start : span.compressed_end]
            try:
                inflate_span(layer.index, n, compressed, bytes(32 << 10))
            except SpanVerificationError:
                return n
    raise AssertionError(f"no span of {entry.name} depends on its window")


def _damage_cached_span(cache_dir: Path, index: LayerIndex, span_no: int) -> None:
    """Overwrite the cached span's bytes in place (same file, size and header): the cache
    checked the file once already, so only the next span's digest can notice."""
    algorithm, hex_digest = index.layer_digest.split(":")
    path = cache_dir / "spans" / algorithm / hex_digest / str(span_no)
    size = path.stat().st_size
    with open(path, "r+b") as damaged:
        damaged.seek(HEADER_SIZE)
        damaged.write(b"\x00" * (size - HEADER_SIZE))


def _read_predecessor_then_damage(
    layer: SplitLayer, reader: LayerReader, cache_dir: Path, entry: TocEntry, span_no: int
) -> None:
    before = layer.index.spans[span_no - 1]
    reader.read(entry, before.uncompressed_end - entry.offset - 100, 100)
    assert reader.is_cached(span_no - 1)
    _damage_cached_span(cache_dir, layer.index, span_no - 1)


def test_a_window_from_a_damaged_cached_predecessor_yields_no_wrong_byte(
    layer: SplitLayer, tmp_path: Path
) -> None:
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = _window_dependent_span(layer, entry)
    span = layer.index.spans[span_no]
    reader = layer.reader(tmp_path)
    try:
        _read_predecessor_then_damage(layer, reader, tmp_path, entry, span_no)
        requests = list(layer.windows.requests)
        got = reader.read(entry, span.uncompressed_start - entry.offset, 100)
        # the held window failed the span's digest; its own window from the blob served it
        assert got == layer.tar[span.uncompressed_start : span.uncompressed_start + 100]
        assert layer.windows.requests == [
            *requests,
            (span.window_offset, span.window_offset + span.window_length - 1),
        ]
        assert reader.counters().fetch_errors == 0
    finally:
        reader.close()


def test_a_damaged_predecessor_and_no_windows_blob_fail_the_read_clearly(
    layer: SplitLayer, tmp_path: Path
) -> None:
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = _window_dependent_span(layer, entry)
    span = layer.index.spans[span_no]
    reader = layer.reader(tmp_path)
    try:
        _read_predecessor_then_damage(layer, reader, tmp_path, entry, span_no)
        layer.windows.stop()
        with pytest.raises(SpanReadError) as failure:
            reader.read(entry, span.uncompressed_start - entry.offset, 100)
        message = str(failure.value)
        assert f"layer {layer.index.layer_digest} span {span_no}" in message
        assert "do not match the uncompressed digest" in message
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
        entry = max(_files(corrupt.index), key=lambda e: e.size)
        span = corrupt.index.spans[_windowed_span_in(corrupt.index, entry)]
        with pytest.raises(SpanReadError) as failure:  # nothing before it is held
            reader.read(entry, span.uncompressed_start - entry.offset, 100)
        assert f"windows blob {corrupt.index.windows.digest}" in str(failure.value)
        assert f"layer {corrupt.index.layer_digest} span " in str(failure.value)
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
        span = layer.index.spans[_windowed_span_in(layer.index, entry)]
        with pytest.raises(SpanReadError, match=f"windows blob {layer.index.windows.digest}"):
            reader.read(entry, span.uncompressed_start - entry.offset, 100)
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

    spans = sum(
        e - b for b, e in (fetch_range(layer.index, n) for n in range(len(layer.index.spans)))
    )
    assert layer.index.windows is not None
    # back to front, no span before is held: every window comes from the windows blob
    numbers = range(len(layer.index.spans))
    reader = layer.reader(tmp_path / "back")
    try:
        fetched = sum(reader.fetch_in_background(n) for n in reversed(numbers))
        assert fetched == spans + layer.index.windows.size
        assert reader.counters().background_bytes == fetched
    finally:
        reader.close()
    # front to back, each window is the tail of the span fetched before
    requests = len(layer.windows.requests)
    reader = layer.reader(tmp_path / "front")
    try:
        fetched = sum(reader.fetch_in_background(n) for n in numbers)
        assert fetched == spans
        assert reader.counters().background_bytes == fetched
        assert len(layer.windows.requests) == requests
    finally:
        reader.close()


def test_a_span_whose_predecessor_is_in_flight_waits_for_it_not_the_windows_blob(
    layer: SplitLayer, tmp_path: Path
) -> None:
    entry = max(_files(layer.index), key=lambda e: e.size)
    span_no = _window_dependent_span(layer, entry)
    span, before = layer.index.spans[span_no], layer.index.spans[span_no - 1]
    gate = threading.Event()
    layer.data.gates[before.compressed_start] = gate  # the span before: held in flight
    reader = layer.reader(tmp_path)
    try:
        results: dict[str, bytes] = {}
        first = threading.Thread(
            target=lambda: results.update(
                before=reader.read(entry, before.uncompressed_end - entry.offset - 100, 100)
            )
        )
        first.start()
        layer.data.wait_for_requests(1)
        if before.window_length:  # nothing before it is held: its own window is fetched
            layer.windows.wait_for_requests(1)
        windows_before = list(layer.windows.requests)
        second = threading.Thread(
            target=lambda: results.update(
                span=reader.read(entry, span.uncompressed_start - entry.offset, 100)
            )
        )
        second.start()
        layer.data.wait_for_requests(2)  # its data request went out; its window did not
        gate.set()
        first.join(TIMEOUT * 2)
        second.join(TIMEOUT * 2)
        assert results == {
            "before": layer.tar[before.uncompressed_end - 100 : before.uncompressed_end],
            "span": layer.tar[span.uncompressed_start : span.uncompressed_start + 100],
        }
        assert layer.windows.requests == windows_before
    finally:
        gate.set()
        reader.close()
