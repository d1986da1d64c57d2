"""Removing trees of any depth: a crafted layer nesting thousands of directories made
shutil.rmtree raise RecursionError on every wipe of its materialized copy (issue 12)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.lazylayers.copy_helper import wipe_contents
from snapshotter.tree_removal import remove_tree

DEPTH = 3000  # deeper than the recursion limit, and its paths longer than PATH_MAX


def deep_tree(top: Path, outside: Path) -> None:
    """DEPTH nested directories, each with a file and a symlink to outside; built relative
    to directory fds because the deep paths pass PATH_MAX."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            os.symlink(outside, "l", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "keep").write_text("not to be removed")
    yield path
    # pytest removes old temporary directories with shutil.rmtree: leave nothing deep behind
    for leftover in tmp_path.iterdir():
        if leftover != path:
            remove_tree(leftover)


def test_shutil_rmtree_cannot_remove_it(tmp_path: Path, outside: Path) -> None:
    deep_tree(tmp_path / "tree", outside)
    with pytest.raises(RecursionError):
        shutil.rmtree(tmp_path / "tree")  # the failure remove_tree exists for


def test_remove_tree_removes_any_depth_and_follows_no_symlink(
    tmp_path: Path, outside: Path
) -> None:
    deep_tree(tmp_path / "tree", outside)
    remove_tree(tmp_path / "tree")
    assert not (tmp_path / "tree").exists()
    assert (outside / "keep").read_text() == "not to be removed"


def test_wipe_contents_of_a_deep_materialized_copy(tmp_path: Path, outside: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    deep_tree(layer / "deep", outside)
    (layer / "file").write_text("x")
    assert wipe_contents(layer) == 2
    assert list(layer.iterdir()) == []
    assert (outside / "keep").exists()
