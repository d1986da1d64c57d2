"""Describe a container's root filesystem, one JSON object per path, from inside the container.

Its source is passed to `python3 -c` in the container (the big image has python3 and nothing
else is needed). Mount points other than / (proc, sys, dev, the files runc bind-mounts such as
/etc/hosts, the /run tmpfs) are skipped: they are not the image's. Keys per path: type (S_IFMT),
mode (permission bits), uid, gid, xattrs (hex values), for non-directories nlink, mtime_ns and
link_group (the first path of a hardlinked inode), for files size and sha256 (or "error: ..."),
for symlinks target and size, for devices rdev.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys


def foreign_mount_points() -> set[str]:
    points = set()
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point != "/":
                points.add(point)
    return points


def xattrs_of(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return {"!listxattr": exc.strerror or str(exc)}
    values = {}
    for name in sorted(names):
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as exc:
            values[name] = "!" + (exc.strerror or str(exc))
    return values


def content_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        return f"error: {exc.strerror}"
    return digest.hexdigest()


def describe(
    path: str, st: os.stat_result, first_path: dict[tuple[int, int], str]
) -> dict[str, object]:
    record: dict[str, object] = {
        "path": path,
        "type": stat.S_IFMT(st.st_mode),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "xattrs": xattrs_of(path),
    }
    if not stat.S_ISDIR(st.st_mode):
        # Directory mtimes are left out: a directory only implied by a layer (no tar entry of
        # its own) gets the unpack time from containerd, so it differs between any two pulls.
        record["mtime_ns"] = st.st_mtime_ns
        record["nlink"] = st.st_nlink
        if st.st_nlink > 1:
            record["link_group"] = first_path.setdefault((st.st_dev, st.st_ino), path)
    if stat.S_ISREG(st.st_mode):
        record["size"] = st.st_size
        record["sha256"] = content_sha256(path)
    elif stat.S_ISLNK(st.st_mode):
        record["target"] = os.readlink(path)
        record["size"] = st.st_size
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        record["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return record


def main() -> None:
    skip = foreign_mount_points()
    first_path: dict[tuple[int, int], str] = {}
    pending = ["/"]
    while pending:
        top = pending.pop()
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if path in skip:
                continue
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
            sys.stdout.write(json.dumps(describe(path, st, first_path), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
