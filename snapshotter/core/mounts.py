"""Mount lists for a snapshot, exactly as containerd's overlayfs snapshotter builds them.

containerd (or the suite) performs these mounts itself; the snapshotter only describes them:
- no parents: a bind mount of the snapshot's own fs dir ("rw", or "ro" for a view);
- a view with one parent: a read-only bind mount of the parent's fs dir;
- otherwise an overlay with lowerdir = the parents' fs dirs, nearest first, plus upperdir and
  workdir for an active snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.core.metadata import Kind

_OVERLAY_INDEX_PARAM = "/sys/module/overlay/parameters/index"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class OverlayFeatures:
    """What the kernel's overlayfs wants; probed once at start like containerd does."""

    index_off: bool = False  # pass "index=off" (the kernel knows the option)
    userxattr: bool = False  # pass "userxattr" (we run in a user namespace)


def probe_overlay_features() -> OverlayFeatures:
    return OverlayFeatures(
        index_off=os.path.exists(_OVERLAY_INDEX_PARAM), userxattr=_running_in_user_namespace()
    )


def _running_in_user_namespace() -> bool:
    # The initial user namespace maps the whole uid range: "0 0 4294967295".
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def snapshot_mounts(
    kind: Kind,
    upper: str,
    work: str,
    parent_uppers: Sequence[str],
    features: OverlayFeatures,
) -> list[Mount]:
    """upper/work: this snapshot's fs and work dirs; parent_uppers: parents' fs, nearest first."""
    if not parent_uppers:
        return [Mount("bind", upper, ("ro" if kind is Kind.VIEW else "rw", "rbind"))]
    if kind is not Kind.ACTIVE and len(parent_uppers) == 1:
        return [Mount("bind", parent_uppers[0], ("ro", "rbind"))]
    options: list[str] = []
    if features.index_off:
        options.append("index=off")
    if features.userxattr:
        options.append("userxattr")
    if kind is Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(parent_uppers))
    return [Mount("overlay", "overlay", tuple(options))]


def mount_points_under(directory: str) -> list[str]:
    """Mount points at or below directory (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(directory)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _unescape_mountinfo(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def detach_mount(path: str) -> None:
    """umount2(path, MNT_DETACH); raises OSError naming the path when the kernel refuses."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    mnt_detach = 2
    if libc.umount2(os.fsencode(path), mnt_detach) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot unmount {path}: {os.strerror(errno)}")
