"""The inode tree shows what an overlayfs lowerdir of the extracted layer would hold."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.fs.tree import OPAQUE_XATTR, ROOT_INO, LayerTree, LayerTreeError
from tests.fs.fs_helpers import (
    Member,
    expected_view,
    make_tar,
    rich_members,
    uncompressed_index,
)


def _tree(members: list[Member]) -> LayerTree:
    return LayerTree.from_index(uncompressed_index(make_tar(members)))


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="needs tarfile filters")
def test_tree_matches_the_extracted_tar(tmp_path: Path) -> None:
    if not _is_root():
        pytest.skip("extracting owners and device nodes needs root")
    tar = make_tar(rich_members())
    tree = LayerTree.from_index(uncompressed_index(tar))
    expected = expected_view(tar, tmp_path)
    seen = {path for path, _ in tree.walk() if path}
    assert seen == set(expected)
    for path, want in expected.items():
        node = tree.lookup(path)
        assert node is not None, path
        assert node.mode == want.mode, path
        assert (node.uid, node.gid) == (want.uid, want.gid), path
        assert node.size == want.size, path
        assert node.rdev == want.rdev, path
        assert node.symlink_target == want.target, path
        assert tuple(sorted(node.xattrs.items())) == want.xattrs, path
        if want.mtime_ns is not None:
            assert node.mtime_ns == want.mtime_ns, path
        if want.nlink is not None:
            assert node.nlink == want.nlink, path


def test_whiteouts_opaque_dirs_and_implicit_parents() -> None:
    tree = _tree(rich_members())
    gone = tree.lookup("/gone")
    assert gone is not None and stat.S_ISCHR(gone.mode) and gone.rdev == 0
    assert tree.lookup("/.wh.gone") is None
    opaque = tree.lookup("/opaque")
    assert opaque is not None and opaque.xattrs[OPAQUE_XATTR] == b"y"
    assert set(opaque.children) == {"kept"}  # the marker itself is hidden
    usr = tree.lookup("/usr")
    assert usr is not None and usr.mode == stat.S_IFDIR | 0o755 and (usr.uid, usr.gid) == (0, 0)


def test_hardlinks_share_one_inode() -> None:
    tree = _tree(rich_members())
    tool, link = tree.lookup("usr/bin/tool"), tree.lookup("usr/bin/tool-link")
    assert tool is link and tool is not None
    assert tool.nlink == 2 and tool.mode == stat.S_IFREG | 0o4755


def test_later_duplicate_wins_and_directories_merge() -> None:
    tree = _tree(
        [
            Member("d", tarfile.DIRTYPE, mode=0o700),
            Member("d/a", data=b"a"),
            Member("d", tarfile.DIRTYPE, mode=0o755, uid=5),  # metadata update, keeps d/a
            Member("f", data=b"old"),
            Member("f", tarfile.SYMTYPE, linkname="d/a"),  # a symlink replaces the file
            Member("x", tarfile.DIRTYPE),
            Member("x/inner", data=b"lost"),
            Member("x", data=b"file now"),  # a file replaces the directory and its content
        ]
    )
    d = tree.lookup("d")
    assert d is not None and d.mode == stat.S_IFDIR | 0o755 and d.uid == 5
    assert set(d.children) == {"a"}
    f = tree.lookup("f")
    assert f is not None and stat.S_ISLNK(f.mode) and f.symlink_target == "d/a"
    x = tree.lookup("x")
    assert x is not None and x.is_regular and tree.lookup("x/inner") is None
    assert tree.root.nlink == 3  # "." + ".." + d (x is no longer a directory)


def test_hardlink_keeps_old_data_when_name_is_replaced() -> None:
    tree = _tree(
        [
            Member("a", data=b"one"),
            Member("b", tarfile.LNKTYPE, linkname="a"),
            Member("a", data=b"two!"),
        ]
    )
    a, b = tree.lookup("a"), tree.lookup("b")
    assert a is not None and b is not None and a is not b
    assert b.size == 3 and b.nlink == 1 and a.size == 4


def test_inode_numbers_are_stable_across_builds() -> None:
    first = {path: node.ino for path, node in _tree(rich_members()).walk()}
    second = {path: node.ino for path, node in _tree(rich_members()).walk()}
    assert first == second and first[""] == ROOT_INO
    assert len(set(first.values())) == len(first) - 1  # only the hardlink pair shares


def test_hardlink_to_a_missing_entry_is_a_clear_error() -> None:
    with pytest.raises(LayerTreeError, match=r"hardlink 'b' points to 'nope'"):
        _tree([Member("b", tarfile.LNKTYPE, linkname="nope")])


def test_entry_below_a_file_is_a_clear_error() -> None:
    with pytest.raises(LayerTreeError, match=r"'f/x' lies under 'f'"):
        _tree([Member("f", data=b"x"), Member("f/x", data=b"y")])


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
