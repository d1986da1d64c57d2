"""Fuzzing the parsers of untrusted bytes (hypothesis): decode_index, the tar TOC parser, the
index builder's inflaters (gzip checkpoints over zlib-ng, zstd frames) and inflate_span.

Property everywhere: any input gives a valid result or the module's documented error
(InvalidIndex, InvalidLayer, SpanVerificationError: all IndexFormatError) - never another
exception - and a valid result is consistent (it re-encodes to itself, the builder's spans
inflate back from the blob it read, the inode tree builds or names the entry it refuses).

Inputs start from structured seeds (valid indexes of gzip/zstd/tar layers, tars of every entry
kind) and are mutated at the level that gets past the outer checks: bytes of the blob, bytes of
the inflated payload (re-compressed under a correct header), values inside the JSON document,
bytes inside tar headers. The test command runs a few seconds of each (LAZYSNAP_FUZZ_EXAMPLES,
default 100, derandomized so CI is repeatable); scripts/fuzz.sh runs them for longer with fresh
seeds. A crash found here becomes a regression test next to the check it concerns
(test_index_shapes.py, test_index_bombs.py).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
from dataclasses import replace
from typing import Any

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.fs.tree import LayerTree, LayerTreeError
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import MAGIC, decode_index, encode_index, encode_index_split
from snapshotter.index.errors import IndexFormatError, InvalidIndex, InvalidLayer
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import fetch_range, inflate_span
from snapshotter.index.tar_toc import TarTocParser
from tests.index.conftest import GZIP_MT, TAR_MT, ZSTD_MT

EXAMPLES = int(os.environ.get("LAZYSNAP_FUZZ_EXAMPLES", "100"))
FRESH_SEEDS = os.environ.get("LAZYSNAP_FUZZ_FRESH") == "1"  # scripts/fuzz.sh
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared, noisy machine; scripts/fuzz.sh reports slow examples instead
    derandomize=not FRESH_SEEDS,
    database=None if not FRESH_SEEDS else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SPAN = 64 << 10


# -- seeds --------------------------------------------------------------------------------------


def _text(seed: int, size: int) -> bytes:
    """Compressible but not trivial: gzip places several checkpoints in it."""
    words = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[: 3 + i % 9] for i in range(512)]
    out = bytearray()
    i = 0
    while len(out) < size:
        out += words[(i * 7919 + seed) % 512].encode() + b" \n"[i % 2 : i % 2 + 1]
        i += 1
    return bytes(out[:size])


def _seed_tar(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **kw: Any) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), 1_700_000_000
            for key, value in kw.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/big", tarfile.REGTYPE, _text(1, 300_000), mode=0o644)
        add("etc/hard", tarfile.LNKTYPE, linkname="etc/big")
        add("etc/link", tarfile.SYMTYPE, linkname="../usr/bin/x", mode=0o777)
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("run/fifo", tarfile.FIFOTYPE)
        add("d/" + "long" * 40 + "/file", tarfile.REGTYPE, b"long name")
        add("etc/.wh.gone", tarfile.REGTYPE)
        add("opq/.wh..wh..opq", tarfile.REGTYPE)
        add("etc/dup", tarfile.REGTYPE, b"first")
        add("etc/dup", tarfile.REGTYPE, b"second wins")
        if fmt == tarfile.PAX_FORMAT:
            add("x/attrs", tarfile.REGTYPE, b"x", pax_headers={"SCHILY.xattr.user.a": "1"})
        add("usr/small", tarfile.REGTYPE, _text(2, 90_000), mode=0o4755, uid=7, gid=8)
    return out.getvalue()


SEED_TARS = {
    "pax": _seed_tar(tarfile.PAX_FORMAT),
    "gnu": _seed_tar(tarfile.GNU_FORMAT),
}


def _zstd_frames(tar: bytes, frame: int = 50_000) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return b"".join(compressor.compress(tar[i : i + frame]) for i in range(0, len(tar), frame))


SEED_BLOBS: dict[str, tuple[bytes, str]] = {
    "gzip": (gzip.compress(SEED_TARS["pax"], 6, mtime=0), GZIP_MT),
    "gzip-members": (
        gzip.compress(SEED_TARS["pax"][:200_000], 6, mtime=0)
        + gzip.compress(SEED_TARS["pax"][200_000:], 1, mtime=0),
        GZIP_MT,
    ),
    "zstd": (_zstd_frames(SEED_TARS["gnu"]), ZSTD_MT),
    "tar": (SEED_TARS["pax"], TAR_MT),
}


def _build(blob: bytes, media_type: str, file_cut_min: int = 0) -> LayerIndex:
    return build_layer_index(
        io.BytesIO(blob), media_type=media_type, span_size=SPAN, file_cut_min=file_cut_min
    )


FILE_CUTS = st.sampled_from([0, 512])  # by size only, or file-aware cuts at nearly every file


SEED_INDEXES = {name: _build(blob, mt) for name, (blob, mt) in SEED_BLOBS.items()}
SEED_ENCODED = [encode_index(index) for index in SEED_INDEXES.values()] + [
    encode_index_split(SEED_INDEXES["gzip"])[0]
]


# -- mutations ----------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, focus: int | None = None) -> bytes:
    """A few byte-level edits: flips, overwrites with edge values, insertions, deletions,
    truncation, duplication of a slice. focus: edit mostly within the first focus bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        limit = min(len(out), focus) if focus else len(out)
        pos = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if kind == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x30, 0x37, 0x20]))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del out[pos:]
        else:
            size = draw(st.integers(1, 64))
            out[pos:pos] = out[pos : pos + size]
    return bytes(out)


def _unpack(encoded: bytes) -> tuple[int, bytes]:
    version = struct.unpack_from(">H", encoded, 8)[0]
    return version, zstandard.ZstdDecompressor().decompress(encoded[20:])


def _pack(version: int, payload: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(level=1).compress(payload)
    return struct.pack(">8sHHQ", MAGIC, version, 0, len(payload)) + frame


# names and values each check must refuse or accept exactly
ODD_STRINGS = ["", ".", "..", "/", "a/../b", "a//b", "\x00", "\ud800", "x" * 300, "reg", "dir",
               "symlink", "hardlink", "sha256:" + "0" * 64]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.sampled_from([0, 1, -1, 255, 256, 4095, 4096, (1 << 63) - 1, 1 << 63, 1 << 40])
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(ODD_STRINGS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@st.composite
def mutated_document(draw: st.DrawFn, document: Any) -> Any:
    """The document with one value somewhere inside it replaced (or a list item removed or
    duplicated): deep enough to reach each field's own check."""
    path: list[Any] = []
    node = document
    while isinstance(node, (list, dict)) and node and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    if not path:
        return draw(JSON_VALUES)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "remove", "duplicate"]))
    if action == "remove":
        del parent[path[-1]]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return document


@st.composite
def hostile_index_bytes(draw: st.DrawFn) -> bytes:
    encoded = draw(st.sampled_from(SEED_ENCODED))
    level = draw(st.sampled_from(["blob", "payload", "document"]))
    if level == "blob":
        return draw(mutated_bytes(encoded, focus=draw(st.sampled_from([None, 32]))))
    version, payload = _unpack(encoded)
    if level == "payload":
        return _pack(version, draw(mutated_bytes(payload)))
    (json_len,) = struct.unpack_from(">I", payload)
    document = json.loads(payload[4 : 4 + json_len])
    document = draw(mutated_document(document))
    text = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return _pack(version, struct.pack(">I", len(text)) + text + payload[4 + json_len :])


# -- properties ---------------------------------------------------------------------------------


def check_decoded(index: LayerIndex) -> None:
    """A decoded index is one encode/decode keeps as it is, and its tree builds (or names the
    entry it cannot place: a documented refusal of the mount)."""
    assert decode_index(encode_index(index)) == index
    try:
        tree = LayerTree.from_index(index)
    except LayerTreeError:
        return
    for _ in tree.walk():
        pass


@FUZZ
@given(hostile_index_bytes())
def test_decode_index_gives_an_index_or_invalid_index(data: bytes) -> None:
    try:
        index = decode_index(data)
    except InvalidIndex:
        return
    check_decoded(index)


@FUZZ
@given(st.binary(max_size=256))
def test_decode_index_of_random_bytes(data: bytes) -> None:
    for candidate in (data, MAGIC + b"\x00\x01\x00\x00" + data):
        with contextlib.suppress(InvalidIndex):
            check_decoded(decode_index(candidate))


def _headers_of(tar: bytes) -> list[int]:
    """Offsets of the tar's header blocks: where mutations reach the parser's checks."""
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            offsets.append(member.offset)
    return offsets


TAR_HEADERS = {name: _headers_of(tar) for name, tar in SEED_TARS.items()}


@st.composite
def hostile_tar(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEED_TARS)))
    tar = SEED_TARS[name]
    header = draw(st.sampled_from(TAR_HEADERS[name]))
    edited = draw(mutated_bytes(tar[header : header + 512]))
    return tar[:header] + edited + tar[header + 512 :]


@FUZZ
@given(hostile_tar(), st.lists(st.integers(1, 4096), min_size=1, max_size=8))
def test_tar_parser_gives_entries_or_invalid_layer(tar: bytes, chunks: list[int]) -> None:
    parser = TarTocParser()
    view = memoryview(tar)
    pos = 0
    try:
        for size in chunks * (len(tar) // sum(chunks) + 1):
            if pos >= len(tar):
                break
            parser.feed(view[pos : pos + size])
            pos += size
        entries = parser.finish()
    except InvalidLayer:
        return
    names = [entry.name for entry in entries]
    assert len(names) == len(set(names))
    for entry in entries:
        assert entry.offset + entry.size <= len(tar), entry.name


@FUZZ
@given(hostile_tar(), FILE_CUTS)
def test_an_index_built_from_any_tar_decodes_and_reads_back(tar: bytes, file_cut_min: int) -> None:
    """What the builder accepts the decoder accepts, and its spans inflate from the blob."""
    for compress, media_type in ((lambda b: b, TAR_MT), (_zstd_frames, ZSTD_MT)):
        blob = compress(tar)
        try:
            index = _build(blob, media_type, file_cut_min)
        except InvalidLayer:
            return
        check_decoded(decode_index(encode_index(index)))
        for number in range(len(index.spans)):
            start, end = fetch_range(index, number)
            inflate_span(index, number, blob[start:end])


@st.composite
def hostile_layer_blob(draw: st.DrawFn) -> tuple[bytes, str]:
    blob, media_type = SEED_BLOBS[draw(st.sampled_from(["gzip", "gzip-members", "zstd"]))]
    return draw(mutated_bytes(blob)), media_type


@FUZZ
@given(hostile_layer_blob(), FILE_CUTS)
def test_the_builder_inflaters_give_an_index_or_invalid_layer(
    blob_and_type: tuple[bytes, str], file_cut_min: int
) -> None:
    blob, media_type = blob_and_type
    try:
        index = _build(blob, media_type, file_cut_min)
    except InvalidLayer:
        return
    decode_index(encode_index(index))
    for number in range(len(index.spans)):
        start, end = fetch_range(index, number)
        inflate_span(index, number, blob[start:end])  # the builder's own spans must read back


@st.composite
def hostile_span(draw: st.DrawFn) -> tuple[LayerIndex, int, bytes]:
    """An attacker's index and blob: span bytes mutated and the span's digest made to match
    them, so the inflater (not the digest check) meets the hostile bytes."""
    name = draw(st.sampled_from(["gzip", "gzip-members", "zstd"]))
    index, (blob, _) = SEED_INDEXES[name], SEED_BLOBS[name]
    number = draw(st.integers(0, len(index.spans) - 1))
    start, end = fetch_range(index, number)
    fetched = draw(mutated_bytes(blob[start:end]))
    span = index.spans[number]
    changed = replace(
        span,
        compressed_end=span.compressed_start + len(fetched),
        digest="sha256:" + hashlib.sha256(fetched).hexdigest(),
        uncompressed_end=span.uncompressed_end + draw(st.sampled_from([0, 0, 1, -1, 1 << 20])),
    )
    spans = (*index.spans[:number], changed, *index.spans[number + 1 :])
    return replace(index, spans=spans), number, fetched


@FUZZ
@given(hostile_span())
def test_inflate_span_of_hostile_bytes_gives_the_span_or_verification_error(
    case: tuple[LayerIndex, int, bytes],
) -> None:
    index, number, fetched = case
    span = index.spans[number]
    try:
        out = inflate_span(index, number, fetched)
    except IndexFormatError:
        return
    assert len(out) == span.uncompressed_size
    assert "sha256:" + hashlib.sha256(out).hexdigest() == span.uncompressed_digest
