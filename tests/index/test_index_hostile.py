"""Tar details and hostile or broken layers: each must index faithfully or fail with a clear
InvalidLayer naming the entry / problem."""

from __future__ import annotations

import base64
import gzip
import tarfile
import time

import pytest
import zstandard

from snapshotter.index.build import build_layer_index
from snapshotter.index.errors import IndexFormatError, InvalidLayer
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import inflate_span
from snapshotter.index.tar_toc import MAX_REPLACED_DIRS
from tests.index.conftest import GZIP_MT, TAR_MT, ZSTD_MT, OnlyRead, node, reg, tar_bytes


def index_of(tar: bytes, media_type: str = TAR_MT) -> LayerIndex:
    blob = {TAR_MT: tar, GZIP_MT: gzip.compress(tar, mtime=0)}.get(media_type)
    if blob is None:
        blob = zstandard.ZstdCompressor().compress(tar)
    return build_layer_index(OnlyRead(blob), media_type=media_type, span_size=64 << 10)


def by_name(index: LayerIndex) -> dict[str, TocEntry]:
    return {e.name: e for e in index.entries}


def test_tar_details_are_recorded() -> None:
    long_name = "deep/" + "d" * 150 + "/file"
    pax_xattrs = {
        "SCHILY.xattr.user.comment": "hello",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "LIBARCHIVE.xattr.user.lib%20name": base64.b64encode(b"\xff\x00bin").decode(),
        "mtime": "1700000000.123456789",
    }
    members = [
        node("./", tarfile.DIRTYPE, mode=0o755),
        reg("./etc/passwd", b"root:x:0:0\n", mode=0o4644, uid=1000, gid=50, uname="u", gname="g"),
        reg("etc/caps", b"x", pax_headers=pax_xattrs),
        reg(long_name, b"long"),
        node("etc/link", tarfile.SYMTYPE, linkname="/../../outside/target"),
        node("etc/hard", tarfile.LNKTYPE, linkname="etc/passwd"),
        node("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        node("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        node("run/fifo", tarfile.FIFOTYPE),
        reg("etc/.wh.removed"),
        reg("var/.wh..wh..opq"),
    ]
    index = index_of(tar_bytes(members), GZIP_MT)
    entries = by_name(index)
    assert list(entries)[:2] == ["", "etc/passwd"]
    root, passwd, caps = entries[""], entries["etc/passwd"], entries["etc/caps"]
    assert root.type is EntryType.DIR
    assert (passwd.mode, passwd.uid, passwd.gid, passwd.uname, passwd.gname, passwd.size) == (
        0o4644, 1000, 50, "u", "g", 11
    )  # fmt: skip
    assert caps.xattrs == {
        "security.capability": b"\x01\x00\x00\x02",
        "user.comment": b"hello",
        "user.lib name": b"\xff\x00bin",
    }
    assert caps.mtime_ns == 1_700_000_000_123_456_789
    assert entries[long_name].size == 4
    assert entries["etc/link"].link_target == "/../../outside/target"
    assert (entries["etc/hard"].type, entries["etc/hard"].link_target) == (
        EntryType.HARDLINK,
        "etc/passwd",
    )
    assert (
        entries["dev/null"].type,
        entries["dev/null"].devmajor,
        entries["dev/null"].devminor,
    ) == (EntryType.CHAR, 1, 3)
    assert entries["dev/sda"].type is EntryType.BLOCK
    assert entries["run/fifo"].type is EntryType.FIFO
    assert "etc/.wh.removed" in entries and "var/.wh..wh..opq" in entries


def test_gnu_longname_and_longlink() -> None:
    target = "t/" + "x" * 120
    members = [reg(target, b"data"), node("l/" + "y" * 120, tarfile.SYMTYPE, linkname=target)]
    entries = by_name(index_of(tar_bytes(members, tarfile.GNU_FORMAT)))
    assert entries["l/" + "y" * 120].link_target == target
    assert entries[target].size == 4


@pytest.mark.parametrize(
    ("name", "why"),
    [("../escape", "'..' component"), ("a/../../b", "'..' component"), ("/etc/abs", "absolute")],
)
def test_names_escaping_the_layer_are_refused(name: str, why: str) -> None:
    with pytest.raises(InvalidLayer, match=f"{name!r}.*{why}"):
        index_of(tar_bytes([reg(name, b"x")]))


def test_hardlink_to_missing_entry() -> None:
    with pytest.raises(InvalidLayer, match=r"'b'.*hardlink to 'nowhere'"):
        index_of(tar_bytes([reg("a", b"1"), node("b", tarfile.LNKTYPE, linkname="nowhere")]))


def test_hardlink_to_later_entry() -> None:
    members = [node("b", tarfile.LNKTYPE, linkname="a"), reg("a", b"1")]
    with pytest.raises(InvalidLayer, match="not an earlier entry"):
        index_of(tar_bytes(members))


@pytest.mark.parametrize("kind", [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
def test_hardlink_to_non_regular_file(kind: bytes) -> None:
    members = [
        node("d", kind, linkname="x" if kind == tarfile.SYMTYPE else ""),
        node("h", tarfile.LNKTYPE, linkname="d"),
    ]
    with pytest.raises(InvalidLayer, match=r"'h'.*only regular files"):
        index_of(tar_bytes(members))


def test_hardlink_chain_points_at_the_regular_file() -> None:
    members = [
        reg("a", b"1"),
        node("b", tarfile.LNKTYPE, linkname="a"),
        node("c", tarfile.LNKTYPE, linkname="b"),
    ]
    assert by_name(index_of(tar_bytes(members)))["c"].link_target == "a"


def test_duplicate_file_later_entry_wins() -> None:
    index = index_of(tar_bytes([reg("f", b"old"), reg("g", b"g"), reg("f", b"newer")]))
    assert [e.name for e in index.entries] == ["g", "f"]
    assert index.entries[-1].size == 5


def test_duplicate_dir_keeps_position_takes_new_metadata() -> None:
    members = [
        node("d", tarfile.DIRTYPE, mode=0o700),
        reg("d/f", b"x"),
        node("d", tarfile.DIRTYPE, mode=0o755),
    ]
    index = index_of(tar_bytes(members))
    assert [(e.name, e.mode) for e in index.entries] == [("d", 0o755), ("d/f", 0o644)]


def test_file_replacing_dir_removes_its_contents() -> None:
    members = [node("d", tarfile.DIRTYPE), reg("d/f", b"x"), reg("dx", b"y"), reg("d", b"file now")]
    index = index_of(tar_bytes(members))
    assert [(e.name, e.type) for e in index.entries] == [
        ("dx", EntryType.REG),
        ("d", EntryType.REG),
    ]


def test_replacing_a_hardlink_target_is_refused() -> None:
    members = [reg("a", b"1"), node("h", tarfile.LNKTYPE, linkname="a"), reg("a", b"2")]
    with pytest.raises(
        InvalidLayer, match="'a' replaces an earlier entry that 'h' is hardlinked to"
    ):
        index_of(tar_bytes(members))


def test_a_hardlink_target_freed_by_replacing_its_link_can_be_replaced() -> None:
    members = [
        reg("a", b"1"),
        node("h", tarfile.LNKTYPE, linkname="a"),
        reg("h", b"h is a file now"),
        reg("a", b"2"),
    ]
    assert [e.name for e in index_of(tar_bytes(members)).entries] == ["h", "a"]


def test_many_duplicates_index_in_linear_time() -> None:
    """Each duplicate rebuilt the whole TOC: 16k entries took 30 s, 262k would take hours."""
    names = [f"f{i}" for i in range(20_000)]
    tar = tar_bytes([reg(name) for name in names] + [reg(name, b"2") for name in names])
    started = time.thread_time()
    entries = index_of(tar).entries
    assert time.thread_time() - started < 10
    assert [(e.name, e.size) for e in entries] == [(name, 1) for name in names]


def test_replacing_too_many_directories_is_refused() -> None:
    members = []
    for i in range(MAX_REPLACED_DIRS + 1):
        members += [node(f"d{i}", tarfile.DIRTYPE), reg(f"d{i}/f"), reg(f"d{i}", b"file")]
    with pytest.raises(InvalidLayer, match=f"replaces more than {MAX_REPLACED_DIRS} directories"):
        index_of(tar_bytes(members))
    index_of(tar_bytes(members[:-3]))  # one fewer is fine


def _header_with_size(name: bytes, size_field: bytes) -> bytes:
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = size_field
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_absurd_entry_size_is_refused() -> None:
    base256 = bytes([0x80]) + (1 << 41).to_bytes(11, "big")
    with pytest.raises(InvalidLayer, match=r"'huge'.*2\^40"):
        index_of(_header_with_size(b"huge", base256) + bytes(1024))


def test_entry_past_end_of_stream_is_refused() -> None:
    tar = tar_bytes([reg("a", b"1"), reg("big", b"z" * 5000)])
    with pytest.raises(InvalidLayer, match="'big' extends past the end"):
        index_of(tar[:2048])


def test_garbage_instead_of_tar_is_refused() -> None:
    with pytest.raises(InvalidLayer, match="checksum"):
        index_of(b"this is not a tar archive".ljust(1024, b"!"))


def test_truncated_gzip_is_refused() -> None:
    blob = gzip.compress(tar_bytes([reg("f", bytes(range(256)) * 2000)]))
    with pytest.raises(InvalidLayer, match="gzip"):
        build_layer_index(OnlyRead(blob[: len(blob) // 2]), media_type=GZIP_MT, span_size=64 << 10)


def test_corrupt_gzip_is_refused() -> None:
    blob = bytearray(gzip.compress(tar_bytes([reg("f", bytes(range(256)) * 2000)])))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(InvalidLayer):
        build_layer_index(OnlyRead(bytes(blob)), media_type=GZIP_MT, span_size=64 << 10)


def test_trailing_garbage_after_gzip_is_refused() -> None:
    blob = gzip.compress(tar_bytes([reg("f", b"x")])) + b"GARBAGE!" * 8
    with pytest.raises(InvalidLayer):
        build_layer_index(OnlyRead(blob), media_type=GZIP_MT, span_size=64 << 10)


def test_truncated_zstd_is_refused() -> None:
    blob = zstandard.ZstdCompressor().compress(tar_bytes([reg("f", bytes(range(256)) * 2000)]))
    with pytest.raises(InvalidLayer, match="zstd layer is truncated"):
        build_layer_index(OnlyRead(blob[:-10]), media_type=ZSTD_MT, span_size=64 << 10)


@pytest.mark.parametrize(
    ("media_type", "blob", "match"),
    [
        (GZIP_MT, b"\x28\xb5\x2f\xfd" + bytes(100), "says gzip, but its bytes look like zstd"),
        (GZIP_MT, bytes(1024), "says gzip, but its bytes look like none"),
        (TAR_MT, gzip.compress(b"x"), "says none, but its bytes look like gzip"),
        (ZSTD_MT, bytes(1024), "says zstd"),
        ("application/vnd.oci.image.config.v1+json", b"{}", "not a tar"),
    ],
)
def test_media_type_and_magic_must_agree(media_type: str, blob: bytes, match: str) -> None:
    with pytest.raises(InvalidLayer, match=match):
        build_layer_index(OnlyRead(blob), media_type=media_type)


def test_zstd_skippable_frames_are_legal() -> None:
    tar = tar_bytes([reg("f", b"payload" * 1000)])
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"meta!"
    blob = skippable + zstandard.ZstdCompressor().compress(tar) + skippable
    index = build_layer_index(OnlyRead(blob), media_type=ZSTD_MT, span_size=64 << 10)
    assert index.compressed_size == len(blob) and index.uncompressed_size == len(tar)
    assert inflate_span(index, 0, blob[: index.spans[0].compressed_end])[:512] == tar[:512]


def test_single_huge_zstd_frame_is_not_randomly_accessible() -> None:
    tar = tar_bytes([reg("zeros", bytes(65 << 20))])
    with_size = zstandard.ZstdCompressor().compress(tar)
    without_size = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    streamed = without_size.compress(tar) + without_size.flush()
    for blob in (with_size, streamed):
        with pytest.raises(InvalidLayer, match=r"single zstd frame.*not randomly accessible"):
            build_layer_index(OnlyRead(blob), media_type=ZSTD_MT)


def test_all_errors_share_one_base() -> None:
    assert issubclass(InvalidLayer, IndexFormatError)
    assert not issubclass(IndexFormatError, IndexError)


def test_layer_root_must_be_a_directory() -> None:
    with pytest.raises(InvalidLayer, match="the layer root must be a directory"):
        index_of(tar_bytes([reg("./", b"not a dir")]))


@pytest.mark.parametrize(
    ("blob", "media_type", "spans"),
    [
        (b"", TAR_MT, 0),
        (gzip.compress(b"") + gzip.compress(b"") + gzip.compress(bytes(10240)), GZIP_MT, 1),
        (gzip.compress(bytes(10240)) + bytes(100), GZIP_MT, 1),  # zero padding after the member
    ],
)
def test_empty_layers_index(blob: bytes, media_type: str, spans: int) -> None:
    index = build_layer_index(OnlyRead(blob), media_type=media_type)
    assert (len(index.entries), len(index.spans), index.compressed_size) == (0, spans, len(blob))
