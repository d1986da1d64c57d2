"""Entries land under the directory that holds their path at that point of the layer, also
when a directory was replaced earlier in the same layer (the builder remembers directories by
path, and a replacement must not leave a stale one behind)."""

from __future__ import annotations

import tarfile

import pytest

from snapshotter.fs.tree import LayerTree, LayerTreeError
from tests.fs.fs_helpers import Member, make_tar, uncompressed_index


def _tree(members: list[Member]) -> LayerTree:
    return LayerTree.from_index(uncompressed_index(make_tar(members)))


def test_entries_after_a_directory_is_replaced_go_to_the_new_directory() -> None:
    tree = _tree(
        [
            Member("a/b", tarfile.DIRTYPE),
            Member("a/b/old", data=b"1"),
            Member("a", data=b"a file replaces the directory"),
            Member("a", tarfile.DIRTYPE),  # and a new, empty directory replaces the file
            Member("a/b/new", data=b"2"),  # a/b is an implicit directory of the new a
        ]
    )
    assert tree.lookup("a/b/old") is None
    new = tree.lookup("a/b/new")
    assert new is not None and new.size == 1
    b = tree.lookup("a/b")
    assert b is not None and set(b.children) == {"new"}


def test_entry_under_a_directory_replaced_by_a_file_is_a_clear_error() -> None:
    with pytest.raises(LayerTreeError, match=r"'a/b/x' lies under 'a'"):
        _tree(
            [
                Member("a/b", tarfile.DIRTYPE),
                Member("a/b/x", data=b"1"),
                Member("a", data=b"file"),
                Member("a/b/x", data=b"2"),
            ]
        )


def test_entries_under_a_whited_out_directory_recreate_it() -> None:
    tree = _tree(
        [
            Member("etc/conf.d", tarfile.DIRTYPE),
            Member("etc/conf.d/one", data=b"1"),
            Member("etc/.wh.conf.d", data=b""),  # whiteout replaces the directory
        ]
    )
    whiteout = tree.lookup("etc/conf.d")
    assert whiteout is not None and not whiteout.is_dir and tree.lookup("etc/conf.d/one") is None


def test_inode_table_holds_only_linked_inodes() -> None:
    tree = _tree(
        [
            Member("d", tarfile.DIRTYPE),
            Member("d/f", data=b"x"),
            Member("d", data=b"file"),  # d and d/f are unlinked
        ]
    )
    linked = {node.ino for _, node in tree.walk()}
    assert len(tree) == len(linked) == 2  # root and the file d
    assert all(tree.inode(ino) is not None for ino in linked)
