"""The start-up pack's format (snapshotter/index/pack.py) and its place in the profile blob:
round trip, and hostile descriptions and chunks refused with an error naming the field."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import pytest
import zstandard

from snapshotter.index.pack import (
    MAX_CHUNK_BYTES,
    PackChunk,
    PackError,
    PackRange,
    PackSection,
    check_section_fits,
    compress_chunk,
    layer_pack_from_json,
    open_chunk,
    plan_chunks,
    section_from_json,
)
from snapshotter.profile.model import (
    ProfileEntry,
    ProfileError,
    ProfilePack,
    StartupProfile,
    decode_profile,
    encode_profile,
)

LAYER = "sha256:" + "ab" * 32
PACK = "sha256:" + "cd" * 32


def _section(tar: bytes, ranges: list[PackRange], chunk_bytes: int) -> tuple[PackSection, bytes]:
    """A section of tar's ranges and the pack bytes holding it."""
    blob = b""
    chunks = []
    for planned in plan_chunks(ranges, chunk_bytes):
        frame = compress_chunk(b"".join(tar[r.start : r.end] for r in planned), level=3)
        chunks.append(PackChunk(len(frame), hashlib.sha256(frame).hexdigest(), planned))
        blob += frame
    return PackSection(0, tuple(chunks)), blob


def test_a_section_round_trips_through_the_profile_and_gives_back_the_ranges_bytes() -> None:
    tar = os.urandom(1000) + b"x" * 50_000 + os.urandom(5000)
    ranges = [
        PackRange(40_000, 9000),
        PackRange(0, 700),
        PackRange(700, 300),
        PackRange(52_000, 10),
    ]
    section, blob = _section(tar, ranges, chunk_bytes=4096)
    assert len(section.chunks) == 3  # 10010 bytes in 4 KiB chunks; ranges split across them
    profile = StartupProfile(
        (ProfileEntry(LAYER, "usr/lib/a.so"),),
        "cmd",
        ProfilePack(PACK, len(blob), {LAYER: section}),
    )
    decoded = decode_profile(encode_profile(profile))
    assert decoded == profile
    layer_pack = decoded.pack_for(LAYER)
    assert layer_pack is not None and decoded.pack_for("sha256:" + "00" * 32) is None
    assert layer_pack_from_json(layer_pack.to_json()) == layer_pack
    position, got = 0, b""
    for number, chunk in enumerate(layer_pack.section.chunks):
        got += open_chunk(chunk, blob[position : position + chunk.compressed_size], f"c{number}")
        position += chunk.compressed_size
    assert got == b"".join(tar[r.start : r.end] for r in ranges)
    # first-read order is kept; adjacent ranges merge
    assert next(r for c in section.chunks for r in c.ranges) == PackRange(40_000, 4096)
    assert PackRange(0, 1000) in [r for c in section.chunks for r in c.ranges]


def test_version_1_profiles_are_still_read() -> None:
    data = json.dumps({"version": 1, "entries": [[LAYER, "a"]], "command": "c"}).encode()
    assert decode_profile(data).pack is None


def _valid() -> dict[str, Any]:
    return {
        "offset": 10,
        "chunks": [
            {"size": 100, "sha256": "ef" * 32, "ranges": [[0, 50], [100, 50]]},
            {"size": 20, "sha256": "01" * 32, "ranges": [[200, 8]]},
        ],
    }


def _broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_valid())
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        (_broken(("offset",), -1), "section.offset"),
        (_broken(("offset",), True), "section.offset"),
        (_broken(("chunks",), []), "section.chunks"),
        (_broken(("chunks", 0, "size"), 0), "section.chunks[0].size"),
        (_broken(("chunks", 0, "sha256"), "EF" * 32), "section.chunks[0].sha256"),
        (_broken(("chunks", 1, "ranges"), [[5, 0]]), "section.chunks[1].ranges[0]"),
        (_broken(("chunks", 1, "ranges"), [[-1, 5]]), "section.chunks[1].ranges[0]"),
        (_broken(("chunks", 1, "ranges"), [[1, 2, 3]]), "section.chunks[1].ranges[0]"),
        (_broken(("chunks", 1, "ranges"), [[120, 10]]), "overlap"),  # inside [100, 150)
        (_broken(("chunks", 1, "ranges"), [[0, MAX_CHUNK_BYTES + 1]]), "section.chunks[1]"),
        (_broken(("chunks", 0, "extra"), 1), "section.chunks[0]"),
        (_broken(("offset",), 1000), "outside the pack"),
    ],
)
def test_hostile_sections_are_refused_naming_the_field(doc: dict[str, Any], named: str) -> None:
    with pytest.raises(PackError, match=named.replace("[", r"\[").replace("]", r"\]")):
        section_from_json(doc, pack_size=1000)


def test_a_hostile_pack_in_a_profile_is_a_profile_error_naming_the_layer() -> None:
    doc = {
        "version": 2,
        "entries": [],
        "pack": {"digest": PACK, "size": 1000, "sections": {LAYER: _broken(("offset",), -1)}},
    }
    with pytest.raises(ProfileError, match=f"pack.sections\\[{LAYER}\\].offset"):
        decode_profile(json.dumps(doc).encode())
    doc["version"] = 1
    with pytest.raises(ProfileError, match="version 1 profile has no pack"):
        decode_profile(json.dumps(doc).encode())


def test_ranges_past_the_layers_end_are_refused() -> None:
    section = section_from_json(_valid(), pack_size=1000)
    check_section_fits(section, 208, "pack")
    with pytest.raises(PackError, match=r"\[200, 208\) ends after the layer's 207"):
        check_section_fits(section, 207, "pack")


def _chunk(data: bytes, frame: bytes) -> PackChunk:
    return PackChunk(len(frame), hashlib.sha256(frame).hexdigest(), (PackRange(0, len(data)),))


def test_chunks_that_do_not_verify_are_refused_before_zstd_sees_them() -> None:
    data = b"hello pack " * 1000
    frame = compress_chunk(data)
    chunk = _chunk(data, frame)
    assert open_chunk(chunk, frame, "c") == data
    with pytest.raises(PackError, match="c: 10 bytes, the profile says"):
        open_chunk(chunk, frame[:10], "c")  # truncated
    flipped = bytes([frame[0] ^ 1]) + frame[1:]
    with pytest.raises(PackError, match=r"c: sha256 .* is not the profile's"):
        open_chunk(chunk, flipped, "c")


def test_a_signed_bomb_is_bounded_by_the_declared_size() -> None:
    """Even bytes whose digest the profile vouches for cannot inflate past what it declares:
    a frame of 64 MiB of zeros declared as 1 KiB of ranges is refused, not inflated."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    declared = PackChunk(len(bomb), hashlib.sha256(bomb).hexdigest(), (PackRange(0, 1024),))
    with pytest.raises(PackError, match="declares 67108864 bytes, the ranges 1024"):
        open_chunk(declared, bomb, "c")
    # without a content size in the frame header: the output stops at the declared size
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (1 << 20))
    unsized = PackChunk(len(streamed), hashlib.sha256(streamed).hexdigest(), (PackRange(0, 10),))
    with pytest.raises(PackError, match="declares -1 bytes"):
        open_chunk(unsized, streamed, "c")
    garbage = b"not zstd at all"
    with pytest.raises(PackError, match="not a zstd frame"):
        open_chunk(_chunk(b"x", garbage), garbage, "c")


def test_chunk_plans_split_long_ranges_and_keep_order() -> None:
    plan = plan_chunks([PackRange(100, 10), PackRange(0, 25), PackRange(25, 5)], 16)
    assert plan == [
        (PackRange(100, 10), PackRange(0, 6)),
        (PackRange(6, 16),),
        (PackRange(22, 8),),
    ]
    with pytest.raises(PackError, match="chunk size 0"):
        plan_chunks([], 0)
