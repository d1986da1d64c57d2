"""Reads rebuilt from an index must equal a full decompression, for every layer format."""

from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.index.build import build_layer_index
from snapshotter.index.errors import InvalidLayer, SpanVerificationError
from snapshotter.index.model import Compression, EntryType, LayerIndex
from snapshotter.index.spans import fetch_range, inflate_span, spans_for_range
from tests.index.conftest import Layer, OnlyRead

LAYER_NAMES = ["python-gzip", "pigz", "multi-member", "tar", "zstd-frames", "zstd-unsized"]


def read_range(index: LayerIndex, blob: bytes, start: int, end: int) -> bytes:
    out = bytearray()
    for span_no in spans_for_range(index, start, end):
        span = index.spans[span_no]
        cstart, cend = fetch_range(index, span_no)
        data = inflate_span(index, span_no, blob[cstart:cend])
        lo = max(start, span.uncompressed_start) - span.uncompressed_start
        hi = min(end, span.uncompressed_end) - span.uncompressed_start
        out += data[lo:hi]
    return bytes(out)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_span_inflates_to_the_original_tar(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    layer, index = layers[name], built[name]
    assert index.layer_digest == "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    assert index.compressed_size == len(layer.blob)
    assert index.uncompressed_size == len(layer.tar)
    assert len(index.spans) > 10
    assert read_range(index, layer.blob, 0, len(layer.tar)) == layer.tar


def test_gzip_checkpoints_use_every_bit_offset(built: dict[str, LayerIndex]) -> None:
    bits = {s.bits for name in ("python-gzip", "pigz") for s in built[name].spans}
    assert bits == set(range(8)), "fixtures should exercise mid-byte checkpoints of all kinds"


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_toc_matches_what_tar_reads(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    with tarfile.open(fileobj=io.BytesIO(layers[name].tar)) as tf:
        members = tf.getmembers()
    entries = {e.name: e for e in built[name].entries}
    assert len(entries) == len(members)
    for member in members:
        entry = entries[member.name.rstrip("/")]
        assert entry.mode == member.mode
        assert entry.mtime_ns == int(member.mtime) * 1_000_000_000
        assert (entry.uid, entry.gid, entry.uname, entry.gname) == (
            member.uid, member.gid, member.uname, member.gname
        )  # fmt: skip
        if member.isreg():
            assert entry.type is EntryType.REG
            assert (entry.offset, entry.size) == (member.offset_data, member.size)
        elif member.issym():
            assert (entry.type, entry.link_target) == (EntryType.SYMLINK, member.linkname)


@pytest.mark.parametrize("name", LAYER_NAMES)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_file_reads_equal_full_decompression(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex], data: st.DataObject
) -> None:
    layer, index = layers[name], built[name]
    files = [e for e in index.entries if e.type is EntryType.REG and e.size]
    entry = data.draw(st.sampled_from(files))
    offset = data.draw(st.integers(0, entry.size - 1))
    length = data.draw(st.integers(1, entry.size - offset))
    start = entry.offset + offset
    assert read_range(index, layer.blob, start, start + length) == layer.tar[start : start + length]


def test_spans_for_range_edges(built: dict[str, LayerIndex]) -> None:
    index = built["python-gzip"]
    first, second = index.spans[0], index.spans[1]
    assert spans_for_range(index, 0, 1) == range(0, 1)
    assert spans_for_range(index, first.uncompressed_end - 1, first.uncompressed_end + 1) == range(
        0, 2
    )
    assert spans_for_range(index, second.uncompressed_start, second.uncompressed_end) == range(1, 2)
    assert spans_for_range(index, 5, 5) == range(0)
    assert spans_for_range(index, index.uncompressed_size, index.uncompressed_size + 10) == range(0)
    last = len(index.spans) - 1
    assert spans_for_range(index, index.uncompressed_size - 1, 1 << 60) == range(last, last + 1)


def test_spans_decode_concurrently(layers: dict[str, Layer], built: dict[str, LayerIndex]) -> None:
    layer, index = layers["pigz"], built["pigz"]

    def one(span_no: int) -> bytes:
        start, end = fetch_range(index, span_no)
        return inflate_span(index, span_no, layer.blob[start:end])

    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(one, list(range(len(index.spans))) * 2))
    assert b"".join(parts[: len(index.spans)]) == layer.tar
    assert parts[: len(index.spans)] == parts[len(index.spans) :]


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_tampered_span_byte_is_refused(
    name: str, layers: dict[str, Layer], built: dict[str, LayerIndex]
) -> None:
    layer, index = layers[name], built[name]
    start, end = fetch_range(index, 3)
    fetched = bytearray(layer.blob[start:end])
    fetched[len(fetched) // 2] ^= 0x01
    with pytest.raises(SpanVerificationError, match=rf"layer {index.layer_digest} span 3"):
        inflate_span(index, 3, bytes(fetched))
    with pytest.raises(SpanVerificationError, match="span 3"):
        inflate_span(index, 3, layer.blob[start : end - 1])


def test_build_is_deterministic_and_reports_progress(layers: dict[str, Layer]) -> None:
    layer = layers["pigz"]
    seen: list[int] = []
    first = build_layer_index(
        OnlyRead(layer.blob, 65_536),
        media_type=layer.media_type,
        span_size=1 << 20,
        expected_digest="sha256:" + hashlib.sha256(layer.blob).hexdigest(),
        progress=seen.append,
    )
    assert sum(seen) == len(layer.blob)
    assert first == build_layer_index(
        OnlyRead(layer.blob), media_type=layer.media_type, span_size=1 << 20
    )
    assert first.compression is Compression.GZIP


def test_expected_digest_mismatch_names_both(layers: dict[str, Layer]) -> None:
    layer = layers["tar"]
    wrong = "sha256:" + "0" * 64
    actual = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    with pytest.raises(InvalidLayer, match=f"expected {wrong}.*{actual}"):
        build_layer_index(OnlyRead(layer.blob), media_type=layer.media_type, expected_digest=wrong)
