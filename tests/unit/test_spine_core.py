"""The snapshot core used directly: overlayfs semantics, errors, crash leftovers, real mounts."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.core.metadata import Kind
from snapshotter.core.mounts import Mount, OverlayFeatures
from snapshotter.core.snapshotter import Info, Snapshotter, Usage


@pytest.fixture
def core(root: Path) -> Iterator[Snapshotter]:
    sn = Snapshotter(str(root))
    yield sn
    sn.close()


def fs_dir(root: Path, mount: Mount) -> Path:
    """The upper (fs) dir of a bind mount, or the upperdir of an overlay."""
    if mount.type == "bind":
        return Path(mount.source)
    upper = [o for o in mount.options if o.startswith("upperdir=")]
    return Path(upper[0].split("=", 1)[1])


def committed_chain(core: Snapshotter, names: list[str]) -> None:
    parent = ""
    for name in names:
        core.prepare(f"{name}-active", parent)
        core.commit(name, f"{name}-active")
        parent = name


def snapshot_dirs(root: Path) -> set[str]:
    return set(os.listdir(root / "snapshots"))


# -- mounts -----------------------------------------------------------------------------------


def test_first_layer_is_a_rw_bind_mount_and_a_view_of_it_a_ro_bind(core: Snapshotter) -> None:
    [mount] = core.prepare("a")
    assert mount.type == "bind"
    assert mount.options == ("rw", "rbind")
    assert Path(mount.source).is_dir()
    core.commit("base", "a")
    [view] = core.view("v", "base")
    assert view == Mount("bind", mount.source, ("ro", "rbind"))
    [empty_view] = core.view("v0")
    assert empty_view.options == ("ro", "rbind")


def test_overlay_lists_parents_nearest_first_with_upper_and_work(core: Snapshotter) -> None:
    committed_chain(core, ["l1", "l2", "l3"])
    [view_of_l1] = core.view("view-l1", "l1")  # a ro bind of l1's own fs dir
    [mount] = core.prepare("top", "l3")
    assert mount.type == "overlay" and mount.source == "overlay"
    opts = dict(o.split("=", 1) for o in mount.options if "=" in o)
    lowers = opts["lowerdir"].split(":")
    assert len(lowers) == 3
    assert lowers[-1] == view_of_l1.source  # the base layer is the lowest
    assert Path(opts["upperdir"]).name == "fs" and Path(opts["workdir"]).name == "work"
    assert Path(opts["upperdir"]).parent == Path(opts["workdir"]).parent
    index_off = os.path.exists("/sys/module/overlay/parameters/index")
    assert ("index=off" in mount.options) == index_off
    [ro] = core.view("ro", "l3")
    assert "lowerdir=" + opts["lowerdir"] in ro.options
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in ro.options)


def test_mounts_answers_what_prepare_answered_and_refuses_committed(core: Snapshotter) -> None:
    committed_chain(core, ["c"])
    prepared = core.prepare("k", "c")
    assert core.mounts("k") == prepared
    with pytest.raises(FailedPrecondition, match="not active or view"):
        core.mounts("c")
    with pytest.raises(NotFound, match="'nope'"):
        core.mounts("nope")


def test_directory_modes_do_not_depend_on_umask(core: Snapshotter, root: Path) -> None:
    old = os.umask(0)
    try:
        [mount] = core.prepare("a")
    finally:
        os.umask(old)
    upper = Path(mount.source)
    assert stat.S_IMODE(upper.stat().st_mode) == 0o755
    assert stat.S_IMODE((upper.parent / "work").stat().st_mode) == 0o711
    old = os.umask(0o077)
    try:
        [view] = core.view("v")
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(view.source).stat().st_mode) == 0o755
    assert not (Path(view.source).parent / "work").exists()  # views have no work dir


def test_child_upper_dir_takes_the_owner_of_the_parent_upper(core: Snapshotter) -> None:
    [mount] = core.prepare("a")
    os.chown(mount.source, 1234, 5678)
    core.commit("base", "a")
    [child] = core.prepare("b", "base")
    st = fs_dir(Path(), child).stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)


# -- errors -----------------------------------------------------------------------------------


def test_bad_requests_get_containerds_error_classes(core: Snapshotter) -> None:
    with pytest.raises(NotFound, match="'missing'"):
        core.prepare("k", "missing")
    core.prepare("k")
    with pytest.raises(AlreadyExists, match="'k'"):
        core.prepare("k")
    with pytest.raises(InvalidArgument, match="not committed"):
        core.prepare("k2", "k")  # an active parent
    core.view("v")
    with pytest.raises(FailedPrecondition, match="'v' is not active"):
        core.commit("from-view", "v")
    core.commit("c", "k")
    core.prepare("k3")
    with pytest.raises(AlreadyExists, match="'c'"):
        core.commit("c", "k3")
    with pytest.raises(NotFound):
        core.commit("x", "gone")
    core.prepare("child", "c")
    with pytest.raises(FailedPrecondition, match="with child"):
        core.remove("c")
    with pytest.raises(NotFound):
        core.remove("gone")
    with pytest.raises(NotFound):
        core.stat("gone")
    with pytest.raises(NotFound):
        core.usage("gone")
    with pytest.raises(InvalidArgument):
        core.prepare("")
    with pytest.raises(InvalidArgument, match="invalid filter"):
        core.list(["name=="])
    # Nothing of the failed calls is visible.
    assert sorted(i.name for i in core.list()) == ["c", "child", "k3", "v"]


def test_oversized_labels_are_rejected_everywhere(core: Snapshotter) -> None:
    big = {"key": "x" * (4096 - 3 + 1)}
    fits = {"key": "x" * (4096 - 3)}
    with pytest.raises(InvalidArgument, match="4096"):
        core.prepare("a", labels=big)
    core.prepare("a", labels=fits)
    with pytest.raises(InvalidArgument):
        core.view("v", labels=big)
    with pytest.raises(InvalidArgument):
        core.commit("c", "a", labels=big)
    core.commit("c", "a")
    with pytest.raises(InvalidArgument):
        core.update(Info(name="c", labels=big))
    # Multi-byte characters count in bytes, as in Go.
    with pytest.raises(InvalidArgument):
        core.prepare("b", labels={"k": "é" * 2048})
    assert [i.name for i in core.list()] == ["c"]


# -- stat / update / list / usage --------------------------------------------------------------


def test_stat_reports_kind_parent_labels_and_equal_timestamps(core: Snapshotter) -> None:
    before = time.time_ns()
    core.prepare("a", labels={"l": "1", "empty": ""})
    info = core.stat("a")
    assert info.kind is Kind.ACTIVE and info.parent == "" and info.labels == {"l": "1"}
    assert before <= info.created_ns == info.updated_ns <= time.time_ns()
    core.commit("c", "a", labels={"new": "yes"})
    info = core.stat("c")
    assert info.kind is Kind.COMMITTED and info.labels == {"new": "yes"}  # not inherited
    with pytest.raises(NotFound):
        core.stat("a")
    core.view("v", "c")
    assert core.stat("v").parent == "c" and core.stat("v").kind is Kind.VIEW


def test_update_changes_only_labels_like_containerd(core: Snapshotter) -> None:
    core.prepare("a", labels={"keep": "1", "drop": "2"})
    created = core.stat("a").created_ns
    # No paths: labels replaced wholesale; name/parent/kind in the request are ignored.
    info = core.update(Info(name="a", parent="elsewhere", kind=Kind.VIEW, labels={"l1": "v1"}))
    assert info.labels == {"l1": "v1"} and info.kind is Kind.ACTIVE and info.parent == ""
    assert info.created_ns == created < info.updated_ns
    # labels.<key>: set one, delete another by naming it without a value.
    core.update(Info(name="a", labels={"l2": "v2", "l9": "ignored"}), ["labels.l2"])
    info = core.update(Info(name="a", labels={}), ["labels.l1"])
    assert info.labels == {"l2": "v2"}
    assert core.stat("a").labels == {"l2": "v2"}
    info = core.update(Info(name="a", labels={"only": "this"}), ["labels"])
    assert info.labels == {"only": "this"}
    for path in ("name", "parent", "kind", "created_at", "labels_x"):
        with pytest.raises(InvalidArgument, match=repr(path)):
            core.update(Info(name="a", labels={"z": "z"}), [path])
    assert core.stat("a").labels == {"only": "this"}
    with pytest.raises(NotFound):
        core.update(Info(name="missing"))


def test_list_filters_follow_containerds_walk_cases(core: Snapshotter) -> None:
    # The data set and expectations of containerd's testsuite checkWalk.
    root_label = {"containerd.io/gc.root": "check-walk"}
    core.prepare("a-np", labels=root_label)
    core.prepare("p-active", labels=root_label)
    core.commit("p", "p-active", labels=root_label)
    core.prepare("a", "p", labels=root_label)
    core.view("v", "p", labels=root_label)
    wl = {**root_label, "l": "1"}
    core.prepare("p-wl-active", labels=wl)
    core.commit("p-wl", "p-wl-active", labels=wl)
    core.prepare("a-wl", "p-wl", labels={**root_label, "l": "2"})
    core.view("v-wl", "p-wl", labels=wl)
    core.prepare("a-np-wl", labels={**root_label, "l": "2"})
    cases = [
        (
            ['labels."containerd.io/gc.root"==check-walk'],
            {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"},
        ),
        (
            ['kind==active,labels."containerd.io/gc.root"==check-walk'],
            {"a-np", "a", "a-wl", "a-np-wl"},
        ),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], {"v", "v-wl"}),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], {"p", "p-wl"}),
        (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
        (["name==a-wl,labels.l"], {"a-wl"}),
        (["parent==p"], {"a", "v"}),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], {"a", "v", "a-wl", "v-wl"}),
        (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l==2"], {"a-wl", "a-np-wl"}),
        (["name~=/^a-/"], {"a-np", "a-wl", "a-np-wl"}),
        (["name~=wl$"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l!=1,kind==active"], {"a-np", "a", "a-wl", "a-np-wl"}),
        ([""], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"}),
    ]
    for filters, expected in cases:
        assert {i.name for i in core.list(filters)} == expected, filters
    names = [i.name for i in core.list()]
    assert names == sorted(names)


@pytest.mark.parametrize(
    "bad", ["name==", "name ==x ,kind==active", "==x", "name===x", 'name=="x', "labels.a/b==x"]
)
def test_malformed_filters_are_invalid_arguments_naming_the_filter(
    core: Snapshotter, bad: str
) -> None:
    with pytest.raises(InvalidArgument, match="invalid filter"):
        core.list([bad])


def test_empty_store_lists_nothing(core: Snapshotter) -> None:
    assert core.list() == []
    assert core.list(["kind==active"]) == []


def test_usage_walks_active_uppers_and_keeps_the_figure_of_commit(core: Snapshotter) -> None:
    [mount] = core.prepare("a")
    empty = core.usage("a")
    assert empty.inodes == 1  # the upper dir itself
    upper = Path(mount.source)
    (upper / "data").write_bytes(os.urandom(64 * 1024))
    os.link(upper / "data", upper / "hardlink")  # one inode, counted once
    (upper / "dir").mkdir()
    grown = core.usage("a")
    assert grown.inodes == empty.inodes + 2
    assert grown.size >= empty.size + 64 * 1024
    core.commit("c", "a")
    assert core.usage("c") == grown
    (upper / "later").write_bytes(b"x" * 8192)  # a committed snapshot's usage is recorded
    assert core.usage("c") == grown
    core.view("v", "c")
    assert core.usage("v") == Usage(0, 0)


# -- remove / cleanup / durability ---------------------------------------------------------------


def test_remove_frees_the_directory_and_the_key(core: Snapshotter, root: Path) -> None:
    [mount] = core.prepare("a")
    assert Path(mount.source).exists()
    core.remove("a")
    assert not Path(mount.source).parent.exists()
    assert snapshot_dirs(root) == set()
    core.prepare("a")  # the key can be used again


def test_cleanup_removes_only_directories_no_snapshot_owns(core: Snapshotter, root: Path) -> None:
    [mount] = core.prepare("a")
    owned = Path(mount.source).parent.name
    leftovers = ["new-123abc", "999", "rm-7-deadbeef"]
    for name in leftovers:
        (root / "snapshots" / name / "fs").mkdir(parents=True)
        (root / "snapshots" / name / "fs" / "file").write_text("x")
    (root / "snapshots" / "stray-file").write_text("x")
    core.cleanup()
    assert snapshot_dirs(root) == {owned}
    assert core.stat("a").kind is Kind.ACTIVE


def test_cleanup_detaches_a_mount_left_in_an_orphan(core: Snapshotter, root: Path) -> None:
    orphan = root / "snapshots" / "4242" / "fs"
    source = root / "elsewhere"
    orphan.mkdir(parents=True)
    source.mkdir()
    (source / "precious").write_text("must survive")
    subprocess.run(["mount", "--bind", str(source), str(orphan)], check=True)
    core.cleanup()
    assert snapshot_dirs(root) == set()
    assert (source / "precious").read_text() == "must survive"  # rmtree never crossed it


def test_state_survives_reopening_and_ids_stay_unique(root: Path) -> None:
    first = Snapshotter(str(root))
    first.prepare("a", labels={"x": "1"})
    first.commit("c", "a")
    [mount] = first.prepare("b", "c")
    first.close()
    second = Snapshotter(str(root))
    assert second.stat("c").kind is Kind.COMMITTED
    assert second.mounts("b") == [mount]
    [new] = second.prepare("d")
    used = {Path(fs_dir(root, mount)).parent.name} | {
        o.split("=", 1)[1].split("/")[-2] for o in mount.options if o.startswith("lowerdir=")
    }
    assert Path(new.source).parent.name not in used
    second.close()


def test_a_stale_directory_at_a_reused_id_is_replaced(core: Snapshotter, root: Path) -> None:
    # A create killed after its rename but before its commit leaves <id> behind, and the id
    # comes round again (its allocation was rolled back): the new snapshot must still work.
    [first] = core.prepare("a")
    next_id = int(Path(first.source).parent.name) + 1
    stale = root / "snapshots" / str(next_id) / "fs"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed prepare")
    [mount] = core.prepare("b")
    assert Path(mount.source) == stale
    assert list(stale.iterdir()) == []


def test_features_come_from_the_kernel_but_can_be_given(root: Path) -> None:
    sn = Snapshotter(str(root), features=OverlayFeatures(index_off=False, userxattr=True))
    sn.prepare("a")
    sn.commit("c", "a")
    [mount] = sn.prepare("b", "c")
    assert "index=off" not in mount.options and "userxattr" in mount.options
    sn.close()


# -- real overlay mounts ------------------------------------------------------------------------


def _mount(mount: Mount, target: Path) -> None:
    options = ",".join(o for o in mount.options)
    subprocess.run(
        ["mount", "-t", mount.type, "-o", options, mount.source, str(target)],
        check=True,
        capture_output=True,
    )


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def test_three_layer_chain_mounts_as_overlay_with_the_right_content(
    core: Snapshotter, root: Path
) -> None:
    target = root / "mnt"
    target.mkdir()
    layers = [
        {"a": "1", "dir/x": "base", "gone": "soon"},
        {"a": "2", "b": "2"},
        {"c": "3", "dir/x": "top"},
    ]
    parent = ""
    for index, files in enumerate(layers):
        key = f"extract-{index}"
        [mount] = core.prepare(key, parent)
        _mount(mount, target)
        try:
            for name, content in files.items():
                path = target / name
                path.parent.mkdir(exist_ok=True)
                path.write_text(content)
            if index == 2:
                (target / "gone").unlink()  # a whiteout in the top layer
        finally:
            _umount(target)
        core.commit(f"layer-{index}", key)
        parent = f"layer-{index}"
    [rw] = core.prepare("container", parent)
    _mount(rw, target)
    try:
        assert (target / "a").read_text() == "2"
        assert (target / "b").read_text() == "2"
        assert (target / "c").read_text() == "3"
        assert (target / "dir" / "x").read_text() == "top"
        assert not (target / "gone").exists()
        (target / "new").write_text("container write")
    finally:
        _umount(target)
    assert (fs_dir(root, rw) / "new").read_text() == "container write"
    [ro] = core.view("ro", parent)
    _mount(ro, target)
    try:
        assert sorted(p.name for p in target.iterdir()) == ["a", "b", "c", "dir"]
        with pytest.raises(OSError):
            (target / "x").write_text("read-only")
    finally:
        _umount(target)
