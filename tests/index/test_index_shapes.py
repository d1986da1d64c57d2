"""Shapes no Linux filesystem (or the copy of a layer to plain files) can hold, and data
ranges that overlap: decode_index refuses each naming the entry and the limit, and the builder
refuses a layer that has them (it is then pulled whole)."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import pytest

from harness.crafted import document_blob, entry, index_blob, layer_document
from snapshotter.index.build import build_layer_index
from snapshotter.index.codec import MAX_DEPTH, NAME_MAX, PATH_MAX, decode_index, encode_index
from snapshotter.index.errors import InvalidIndex, InvalidLayer
from tests.index.conftest import TAR_MT, OnlyRead, node, reg, tar_bytes


def decode_entries(*entries: list[Any], size: int = 1 << 20) -> None:
    decode_index(document_blob(layer_document([entry("", "dir"), *entries], size)))


def test_a_name_component_of_name_max_bytes_is_fine_one_more_is_refused() -> None:
    decode_entries(entry("d/" + "a" * NAME_MAX, "dir"))
    decode_entries(entry("d/" + "é" * (NAME_MAX // 2), "dir"))  # 254 bytes of UTF-8
    with pytest.raises(InvalidIndex, match=r"entry 'd/a+.*is 256 bytes, more than NAME_MAX = 255"):
        decode_entries(entry("d/" + "a" * (NAME_MAX + 1), "dir"))
    with pytest.raises(InvalidIndex, match=r"is 4000 bytes, more than NAME_MAX"):
        decode_entries(entry("d/" + "x" * 4000, "dir"))
    with pytest.raises(InvalidIndex, match=r"name is 5000 bytes, more than PATH_MAX - 1"):
        decode_entries(entry("x" * 5000, "dir"))  # issue 12: made its directory unreadable (EIO)
    with pytest.raises(InvalidIndex, match=r"is 256 bytes, more than NAME_MAX"):
        decode_entries(entry("é" * 128, "dir"))  # 128 characters, 256 bytes


def test_names_longer_than_path_max_are_refused() -> None:
    name = "/".join(["p" * 200] * 25)[: PATH_MAX - 1]
    decode_entries(entry(name, "dir"))
    with pytest.raises(InvalidIndex, match=r"name is 4096 bytes, more than PATH_MAX - 1 = 4095"):
        decode_entries(entry(name + "q", "dir"))


def test_paths_deeper_than_the_limit_are_refused() -> None:
    decode_entries(entry("/".join(["d"] * MAX_DEPTH), "dir"))
    with pytest.raises(InvalidIndex, match=rf"{MAX_DEPTH + 1} components deep, more than 512"):
        decode_entries(entry("/".join(["d"] * (MAX_DEPTH + 1)), "dir"))
    with pytest.raises(InvalidIndex, match=r"5999 bytes, more than PATH_MAX"):
        decode_entries(entry("/".join(["d"] * 3000), "dir"))  # issue 12: RecursionError


def test_symlink_targets_longer_than_path_max_are_refused() -> None:
    decode_entries(entry("l", "symlink", link="t" * (PATH_MAX - 1)))
    with pytest.raises(InvalidIndex, match=r"entry 'l'.*link target is 4096 bytes"):
        decode_entries(entry("l", "symlink", link="t" * PATH_MAX))


@pytest.mark.parametrize("field", [0, 9])
def test_lone_surrogates_are_refused_not_a_crash(field: int) -> None:
    item = entry("name", "symlink", link="target")
    item[field] = "bad\ud800"
    document = layer_document([entry("", "dir"), item], 1024)
    text = json.dumps(document).encode()  # ensure_ascii: "\ud800" survives as an escape
    with pytest.raises(InvalidIndex, match="lone surrogate"):
        decode_index(index_blob(text, len(text)))


def test_undecodable_tar_bytes_stay_valid_names() -> None:
    decode_entries(entry("caf\udce9", "dir"))  # b"caf\xe9" from a tar, surrogate-escaped


def test_overlapping_data_ranges_are_refused() -> None:
    files = [entry(f"f{i}", size=6 << 20, offset=512) for i in range(50)]  # issue 12
    with pytest.raises(InvalidIndex, match=r"entry 'f1'.offset: data at 512 overlaps"):
        decode_entries(*files, size=8 << 20)
    with pytest.raises(InvalidIndex, match=r"entry 'b'.offset: data at 1000 overlaps .* 1024"):
        decode_entries(entry("a", size=512, offset=512), entry("b", size=10, offset=1000))
    with pytest.raises(InvalidIndex, match=r"entry 'b'.offset"):  # earlier than the one before
        decode_entries(entry("a", size=10, offset=4096), entry("b", size=10, offset=512))
    with pytest.raises(InvalidIndex, match=r"entry 'b'.offset"):  # an empty file inside
        decode_entries(entry("a", size=100, offset=512), entry("b", offset=600))


def test_data_in_tar_order_with_hardlinks_decodes() -> None:
    decode_entries(
        entry("a", size=512, offset=512),
        entry("h", "hardlink", link="a"),
        entry("e", offset=1536),
        entry("b", size=10, offset=2048),
    )


def test_builder_refuses_a_layer_the_kernel_cannot_hold() -> None:
    long_component = "d/" + "a" * (NAME_MAX + 1)
    tar = tar_bytes([node("./", tarfile.DIRTYPE), reg(long_component, b"x")])
    with pytest.raises(InvalidLayer, match=r"more than NAME_MAX = 255"):
        build_layer_index(OnlyRead(tar), media_type=TAR_MT, span_size=64 << 10)


def test_builder_output_passes_the_decoder_at_the_limits() -> None:
    name = "d/" + "a" * NAME_MAX
    tar = tar_bytes([node("./", tarfile.DIRTYPE), reg(name, b"x" * 700), reg("b", b"y")])
    index = build_layer_index(io.BytesIO(tar), media_type=TAR_MT, span_size=64 << 10)
    assert decode_index(encode_index(index)) == index
