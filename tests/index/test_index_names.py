"""Entry names in a decoded index: every name that is not normalised (an empty, '.' or '..'
part, a leading or trailing '/') or holds a NUL is refused, wherever it sits among thousands
of good names; names with unusual but legal characters load."""

from __future__ import annotations

import pytest

from snapshotter.index.codec import decode_index, encode_index
from snapshotter.index.errors import InvalidIndex, InvalidLayer
from snapshotter.index.model import LayerIndex
from snapshotter.index.tar_toc import normalise_name
from tests.index.test_index_codec import repack, unpack

BAD_NAMES = [
    "..",
    ".",
    "../x",
    "a/..",
    "a/../b",
    "./a",
    "a/.",
    "a/./b",
    "a//b",
    "/a",
    "a/",
    "a\0b",
]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_bad_name_anywhere_is_refused(
    bad: str, position: str, built: dict[str, LayerIndex]
) -> None:
    document, blob = unpack(encode_index(built["python-gzip"]))
    entries = document["entries"]
    files = [i for i, item in enumerate(entries) if item[1] == "reg"]
    victim = {"first": files[0], "middle": files[len(files) // 2], "last": files[-1]}[position]
    entries[victim][0] = bad
    with pytest.raises(InvalidIndex, match=r"not normalised or escapes|without NUL"):
        decode_index(repack(document, blob))


@pytest.mark.parametrize("odd", ["a..b/c", "...", "..a", "a/.b", "sp ace/tab\there", "nl\nin name"])
def test_odd_but_normalised_names_load(odd: str, built: dict[str, LayerIndex]) -> None:
    document, blob = unpack(encode_index(built["python-gzip"]))
    victim = next(i for i, item in enumerate(document["entries"]) if item[1] == "reg")
    document["entries"][victim][0] = odd
    decoded = decode_index(repack(document, blob))
    assert decoded.entries[victim].name == odd


# Names as tar writers put them in layers; the builder stores their normal form.
TAR_NAMES = {
    "usr/bin/python3": "usr/bin/python3",
    "usr/lib/": "usr/lib",
    "./usr/lib/": "usr/lib",
    "./": "",
    ".": "",
    "a//b": "a/b",
    "a/./b/": "a/b",
    "a/b//": "a/b",
    ".hidden": ".hidden",
    "dir/.wh..wh..opq": "dir/.wh..wh..opq",
    "a..b/c.d": "a..b/c.d",
    "...": "...",
    "a/...": "a/...",
}


@pytest.mark.parametrize(("raw", "normal"), sorted(TAR_NAMES.items()))
def test_tar_names_are_normalised_as_extraction_sees_them(raw: str, normal: str) -> None:
    assert normalise_name(raw, "name") == normal


@pytest.mark.parametrize("raw", ["..", "../x", "a/..", "a/../b", "a/../", "./..", "a/b/.."])
def test_tar_names_that_climb_out_are_refused(raw: str) -> None:
    with pytest.raises(InvalidLayer, match=r"'\.\.' component"):
        normalise_name(raw, "name")
