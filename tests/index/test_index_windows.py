"""Index format version 2: span windows in their own windows blob (encode_index_split)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import zstandard

from snapshotter.index.codec import (
    MAX_WINDOW,
    decode_index,
    decode_window,
    encode_index,
    encode_index_split,
    encode_window,
)
from snapshotter.index.errors import InvalidIndex, SpanVerificationError
from snapshotter.index.model import LayerIndex, WindowsBlob
from snapshotter.index.spans import fetch_range, inflate_span
from tests.index.conftest import Layer
from tests.index.test_index_codec import Document, repack, unpack

GZIP_LAYERS = ["python-gzip", "pigz", "multi-member"]


def _window_of(index: LayerIndex, windows: bytes, span_no: int) -> bytes | None:
    span = index.spans[span_no]
    if not span.window_length:
        return None
    return decode_window(windows[span.window_offset : span.window_offset + span.window_length])


@pytest.mark.parametrize("name", GZIP_LAYERS)
def test_split_round_trip_is_exact_and_deterministic(
    name: str, built: dict[str, LayerIndex], layers: dict[str, Layer]
) -> None:
    inline = dataclasses.replace(built[name], prefetch=(built[name].entries[5].name,))
    index_blob, windows = encode_index_split(inline)
    decoded = decode_index(index_blob, expected_layer_digest=inline.layer_digest)
    assert decoded.version == 2
    assert decoded.windows == WindowsBlob(
        "sha256:" + hashlib.sha256(windows).hexdigest(), len(windows)
    )
    assert encode_index(decoded) == index_blob  # a decoded v2 index re-encodes to the same bytes
    # the same layer built again gives the same two blobs
    rebuilt = dataclasses.replace(layers[name].build(), prefetch=inline.prefetch)
    assert encode_index_split(rebuilt) == (index_blob, windows)
    # every window comes back from its frame, and the TOC and span ranges are unchanged
    assert decoded.entries == inline.entries
    for number, (ours, theirs) in enumerate(zip(decoded.spans, inline.spans, strict=True)):
        assert ours.window == b""
        assert (_window_of(decoded, windows, number) or b"") == theirs.window
        assert dataclasses.replace(ours, window_offset=0, window_length=0) == dataclasses.replace(
            theirs, window=b""
        )


@pytest.mark.parametrize("name", ["tar", "zstd-frames"])
def test_layers_without_windows_stay_version_1(name: str, built: dict[str, LayerIndex]) -> None:
    assert encode_index_split(built[name]) == (encode_index(built[name]), b"")
    assert decode_index(encode_index(built[name])).windows is None


def test_the_windows_leave_the_index_blob(built: dict[str, LayerIndex]) -> None:
    index = built["python-gzip"]
    v1 = encode_index(index)
    index_blob, windows = encode_index_split(index)
    assert len(index_blob) * 4 < len(windows)  # 256 KiB spans: the windows are most of it
    assert len(index_blob) + len(windows) < len(v1) * 1.3  # independent frames cost a little


def test_spans_inflate_with_windows_from_the_windows_blob(
    built: dict[str, LayerIndex], layers: dict[str, Layer]
) -> None:
    layer = layers["multi-member"]
    index_blob, windows = encode_index_split(built["multi-member"])
    index = decode_index(index_blob)
    out = bytearray()
    for number in range(len(index.spans)):
        begin, end = fetch_range(index, number)
        out += inflate_span(
            index, number, layer.blob[begin:end], _window_of(index, windows, number)
        )
    assert bytes(out) == layer.tar


def test_a_span_with_a_missing_or_wrong_window_fails_verification(
    built: dict[str, LayerIndex], layers: dict[str, Layer]
) -> None:
    blob = layers["python-gzip"].blob
    index_blob, windows = encode_index_split(built["python-gzip"])
    index = decode_index(index_blob)
    number = next(n for n, s in enumerate(index.spans) if s.window_length and not s.bits)
    begin, end = fetch_range(index, number)
    with pytest.raises(SpanVerificationError, match=f"span {number}: its window"):
        inflate_span(index, number, blob[begin:end])
    wrong = _window_of(index, windows, number + 1)
    assert wrong is not None
    with pytest.raises(SpanVerificationError, match=f"span {number}: "):
        inflate_span(index, number, blob[begin:end], wrong)


def test_window_frames_are_bounded_and_checked() -> None:
    window = bytes(range(256)) * 128
    assert decode_window(encode_window(window)) == window
    frame = bytearray(encode_window(window))
    frame[-1] ^= 1  # the frame's checksum
    with pytest.raises(InvalidIndex, match="window frame: corrupt"):
        decode_window(bytes(frame))
    with pytest.raises(InvalidIndex, match="window frame"):
        decode_window(b"")
    too_big = zstandard.ZstdCompressor().compress(b"\0" * (MAX_WINDOW + 1))
    with pytest.raises(InvalidIndex, match="declares 32769 bytes"):
        decode_window(too_big)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    with pytest.raises(InvalidIndex, match="window frame: declares"):
        decode_window(unsized)


def test_encode_index_refuses_mixed_windows(built: dict[str, LayerIndex]) -> None:
    index = built["python-gzip"]
    external = decode_index(encode_index_split(index)[0])
    with pytest.raises(ValueError, match="already external"):
        encode_index_split(external)
    with pytest.raises(ValueError, match="inline windows only"):
        encode_index(dataclasses.replace(index, windows=external.windows))
    with pytest.raises(ValueError, match="inline windows only"):
        encode_index(dataclasses.replace(external, windows=None))


@pytest.fixture
def split(built: dict[str, LayerIndex]) -> bytes:
    return encode_index_split(built["python-gzip"])[0]


def _span(i: int, field: int, value: Any) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        document["spans"][i][field] = value

    return change


def _windows(value: Any) -> Callable[[Document], None]:
    return lambda document: document.__setitem__("windows", value)


def _grow_windows(document: Document) -> None:
    document["windows"]["size"] += 1


def _last_window_past_the_blob(document: Document) -> None:
    document["spans"][-1][8] += 1  # ends 1 byte past the blob's declared size


HOSTILE_V2: dict[str, tuple[Callable[[Document], None], str]] = {
    "window offset not contiguous": (_span(2, 7, 0), r"spans\[2\].window_offset"),
    "window range outside the blob": (_last_window_past_the_blob, r"spans\[-?\d+\].window_length"),
    "window frame too long": (_span(1, 8, 40000), r"spans\[1\].window_length"),
    "negative offset": (_span(1, 7, -1), r"spans\[1\].window_offset"),
    "blob size not the windows' end": (_grow_windows, r"windows.size"),
    "windows not an object": (_windows(["sha256:" + "0" * 64, 5]), r"windows: expected keys"),
    "windows extra key": (
        lambda d: d["windows"].__setitem__("urls", []),
        r"windows: expected keys",
    ),
    "windows bad digest": (
        lambda d: d["windows"].__setitem__("digest", "md5:1"),
        r"windows.digest",
    ),
    "windows size string": (lambda d: d["windows"].__setitem__("size", "9"), r"windows.size"),
    "no windows key": (lambda d: d.pop("windows"), r"expected keys"),
    "mid-byte span without window": (
        lambda d: next(s for s in d["spans"] if s[6]).__setitem__(8, 0),
        r"needs its window|window_offset",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_V2))
def test_hostile_v2_index_is_refused_naming_the_field(case: str, split: bytes) -> None:
    change, match = HOSTILE_V2[case]
    document, blob = unpack(split)
    decode_index(repack(document, blob, version=2))  # the unchanged repack is valid
    change(document)
    with pytest.raises(InvalidIndex, match=match):
        decode_index(repack(document, blob, version=2))


def test_a_windows_key_in_a_version_1_index_is_refused(split: bytes) -> None:
    document, blob = unpack(split)
    with pytest.raises(InvalidIndex, match="expected keys"):
        decode_index(repack(document, blob, version=1))


def test_zstd_spans_carry_no_external_window(built: dict[str, LayerIndex]) -> None:
    document, blob = unpack(encode_index(built["zstd-frames"]))
    for item in document["spans"]:
        item[7:9] = [0, 0]
    document["spans"][1][8] = 10
    document["windows"] = {"digest": "sha256:" + "0" * 64, "size": 10}
    with pytest.raises(InvalidIndex, match=r"spans\[1\].window: zstd spans carry no window"):
        decode_index(repack(document, blob, version=2))
