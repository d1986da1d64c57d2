"""Index blobs crafted to cost a reader memory: each is refused, naming the cap, before the
memory is spent (docs/index-format.md "Limits")."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from harness.crafted import (
    MAGIC,
    document_blob,
    empty_lists_bomb,
    index_blob,
    many_entries,
)
from snapshotter.index import codec
from snapshotter.index.codec import decode_index
from snapshotter.index.errors import InvalidIndex, SpanVerificationError
from snapshotter.index.model import Compression, LayerIndex, Span
from snapshotter.index.spans import inflate_span
from tests.index.conftest import GZIP_MT

REPO = Path(__file__).resolve().parents[2]
PEAK_CHILD = """
import sys
from snapshotter.index.codec import decode_index
from snapshotter.index.errors import InvalidIndex, SpanVerificationError
from snapshotter.index.model import Compression, LayerIndex, Span
from snapshotter.index.spans import inflate_span
from tests.index.conftest import GZIP_MT
data = open(sys.argv[1], "rb").read()
try:
    decode_index(data)
    print("decoded")
except InvalidIndex as exc:
    print(exc)
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
"""


def decode_in_child(tmp_path: Path, data: bytes) -> tuple[str, int]:
    """decode_index(data) in a fresh process: (outcome, its peak RSS in MB)."""
    path = tmp_path / "index.bin"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.splitlines()
    return out[0], int(out[1]) // 1024


def test_zstd_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = empty_lists_bomb(160 << 20)  # issue 12: 4.2 GB resident before this cap
    assert len(bomb) < 64 << 10
    outcome, peak_mb = decode_in_child(tmp_path, bomb)
    print(f"160 MiB bomb in {len(bomb)} bytes: {outcome}; peak RSS {peak_mb} MB")
    assert "payload length" in outcome and "64x the blob" in outcome
    assert peak_mb < 60


def test_bomb_padded_past_the_ratio_cap_meets_the_value_cap(tmp_path: Path) -> None:
    json_bytes = 3 * (codec.MAX_JSON_VALUES // 2 + 1000)  # just over the cap
    padding = (json_bytes - codec.PAYLOAD_RATIO_SLACK) // (codec.MAX_PAYLOAD_RATIO - 1) + 1
    outcome, peak_mb = decode_in_child(tmp_path, empty_lists_bomb(json_bytes, padding))
    print(f"value-cap bomb: {outcome}; peak RSS {peak_mb} MB")
    assert f"more than {codec.MAX_JSON_VALUES}" in outcome
    assert peak_mb < 80  # the 16 MB of JSON text, never the 5M lists


def test_json_over_its_cap_is_refused_before_inflating(tmp_path: Path) -> None:
    text = b"[" + b"0," * (codec.MAX_JSON // 2) + b"0]"
    padding = os.urandom((len(text) - codec.PAYLOAD_RATIO_SLACK) // (codec.MAX_PAYLOAD_RATIO - 1))
    outcome, peak_mb = decode_in_child(tmp_path, index_blob(text, len(text), padding))
    assert f"exceeds the {codec.MAX_JSON} byte cap" in outcome
    assert peak_mb < 60


def test_frame_declaring_another_size_than_the_header() -> None:
    payload = struct.pack(">I", 2) + b"{}"
    frame = zstandard.ZstdCompressor().compress(payload + b"\0" * 1000)  # declares 1006
    data = struct.pack(">8sHHQ", MAGIC, 1, 0, len(payload)) + frame
    with pytest.raises(InvalidIndex, match="frame declares 1006 bytes, header 6"):
        decode_index(data)


def test_frame_inflating_past_the_header_without_declaring() -> None:
    data = index_blob(b"{}", 2, b"\0" * 5000, payload_len=100)
    with pytest.raises(InvalidIndex, match="payload"):
        decode_index(data)


def test_a_valid_index_within_the_caps_decodes() -> None:
    index = decode_index(document_blob(many_entries(2000)))
    assert len(index.entries) == 2001


def test_entry_count_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_ENTRIES", 100)
    decode_index(document_blob(many_entries(99)))
    with pytest.raises(InvalidIndex, match="at most 100 entries"):
        decode_index(document_blob(many_entries(100)))


def test_total_name_bytes_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    document = many_entries(50)
    total = sum(len(item[0].encode()) for item in document["entries"])
    monkeypatch.setattr(codec, "MAX_NAME_BYTES", total)
    decode_index(document_blob(document))
    monkeypatch.setattr(codec, "MAX_NAME_BYTES", total - 1)
    with pytest.raises(InvalidIndex, match=f"names total {total} bytes, more than {total - 1}"):
        decode_index(document_blob(document))


def _span0_of(data: bytes, output: bytes) -> tuple[LayerIndex, bytes]:
    def digest(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    span = Span(0, len(data), 0, len(output), digest(data), digest(output))
    index = LayerIndex(
        "sha256:" + "0" * 64, GZIP_MT, Compression.GZIP, len(data), len(output), 1 << 20, (),
        (span,),
    )  # fmt: skip
    return index, data


def test_a_span_of_many_empty_gzip_members_is_refused_in_linear_time() -> None:
    """An attacker's index and blob (the digest matches their bytes): 400k empty members
    before the data took minutes of CPU (zlib copies the rest of the input per member)."""
    empty, real = gzip.compress(b"", mtime=0), gzip.compress(b"x" * 100, mtime=0)
    index, data = _span0_of(empty * 400_000 + real, b"x" * 100)
    started = time.thread_time()
    with pytest.raises(SpanVerificationError, match="more than 4096 gzip members"):
        inflate_span(index, 0, data)
    assert time.thread_time() - started < 1.0


def test_a_span_with_a_few_empty_gzip_members_still_reads() -> None:
    empty, real = gzip.compress(b"", mtime=0), gzip.compress(b"x" * 100_000, mtime=0)
    index, data = _span0_of(empty * 100 + real + empty, b"x" * 100_000)
    assert inflate_span(index, 0, data) == b"x" * 100_000


def test_string_count_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    document = many_entries(20)  # 21 entries x 5 strings, 2 span digests, keys: ~120 strings
    decode_index(document_blob(document))
    monkeypatch.setattr(codec, "MAX_JSON_STRINGS", 100)
    with pytest.raises(InvalidIndex, match=r"JSON holds up to \d+ strings, more than 100"):
        decode_index(document_blob(document))
