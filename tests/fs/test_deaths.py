"""deaths.py: following processes through pidfds, finding the mounts that read through a FUSE
mount in the kernel's mount table, and the death record `lazysnap status` reads."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

from snapshotter.lazylayers.deaths import (
    KEPT_DEATHS,
    Death,
    DeathWatch,
    MountEntry,
    Stranded,
    append_death,
    mount_table,
    overlays_using,
    read_record,
)

LAYER = "/var/lib/lazysnap/snapshots/7/fs"
SNAPS = "/var/lib/lazysnap/snapshots"
TASKS = "/run/containerd/io.containerd.runtime.v2.task"
# /proc/self/mountinfo lines as the kernel writes them (a space in a path is \040).
MOUNTINFO = [
    "30 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
    f"812 30 0:61 / {LAYER} ro,nosuid,nodev,relatime shared:400 - fuse.lazysnap "
    "lazysnap:sha256:ab ro,user_id=0,group_id=0,default_permissions,allow_other",
    f"820 30 0:70 / {TASKS}/default/web/rootfs rw,relatime shared:410 - overlay overlay "
    f"rw,lowerdir={LAYER}:{SNAPS}/3/fs,upperdir={SNAPS}/9/fs,workdir={SNAPS}/9/work",
    f"821 30 0:71 / {TASKS}/k8s.io/0123abcd/rootfs rw,relatime shared:411 - overlay overlay "
    "rw,lowerdir=7/fs:3/fs,upperdir=10/fs,workdir=10/work",
    "822 30 0:72 / /mnt/other rw,relatime shared:412 - overlay overlay "
    f"rw,lowerdir={SNAPS}/17/fs,upperdir=/u,workdir=/w",
    "823 30 0:61 / /mnt/bind\\040copy ro,relatime shared:400 - fuse.lazysnap "
    "lazysnap:sha256:ab ro,user_id=0",
]


def _table() -> list[MountEntry]:
    return [e for e in map(MountEntry.parse, MOUNTINFO) if e is not None]


def test_finds_overlays_stacked_on_the_layer_and_bind_mounts_of_it() -> None:
    found = overlays_using(LAYER, _table())
    assert [(s.mount_id, s.container) for s in found] == [
        (820, "default/web"),
        (821, "k8s.io/0123abcd"),  # containerd's relative lowerdirs (long option strings)
        (823, ""),
    ]
    assert found[2].target == "/mnt/bind copy" and found[2].name() == "/mnt/bind copy"
    assert overlays_using("/var/lib/lazysnap/snapshots/1/fs", _table()) == []


def test_reads_this_process_mount_table() -> None:
    table = mount_table()
    assert any(entry.target == "/" for entry in table)


def test_record_keeps_the_count_and_the_last_deaths(tmp_path: Path) -> None:
    mountpoint = str(tmp_path / "fs")
    assert read_record(mountpoint).count == 0
    web = Stranded(820, f"{TASKS}/default/web/rootfs", "default/web")
    for pid in range(100, 100 + KEPT_DEATHS + 2):
        append_death(mountpoint, Death(pid, float(pid), "sha256:ab", (web,), restarted=True))
    record = read_record(mountpoint)
    assert record.count == KEPT_DEATHS + 2
    assert [d.pid for d in record.last] == list(range(102, 102 + KEPT_DEATHS))
    assert record.last[-1].stranded == (web,) and record.last[-1].restarted
    # Still listed while that very mount exists; a new mount at the same path is another one.
    assert record.stranded_now(_table()) == [web]
    remounted = [MountEntry(900, "0:80", web.target, "overlay", "")]
    assert record.stranded_now(remounted) == []


def test_an_unreadable_record_reads_as_none(tmp_path: Path) -> None:
    mountpoint = tmp_path / "fs"
    mountpoint.with_name("fs.lazysnap-deaths.json").write_text("{not json")
    assert read_record(str(mountpoint)).count == 0


def test_watch_reports_a_death_and_not_a_forgotten_process() -> None:
    deaths: queue.Queue[tuple[str, int]] = queue.Queue()
    watch = DeathWatch(lambda mountpoint, pid: deaths.put((mountpoint, pid)))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    killed = subprocess.Popen(sleeper)
    stopped = subprocess.Popen(sleeper)
    try:
        watch.follow("/a", killed.pid)
        watch.follow("/b", stopped.pid)
        assert watch.followed("/a") == killed.pid
        watch.forget("/b")  # as unmount() does before it stops the process
        stopped.terminate()
        stopped.wait()
        killed.kill()
        killed.wait()
        assert deaths.get(timeout=10) == ("/a", killed.pid)
        assert deaths.empty() and watch.followed("/a") is None
    finally:
        watch.close()
        for process in (killed, stopped):
            if process.poll() is None:
                process.kill()
                process.wait()
