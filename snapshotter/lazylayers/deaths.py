"""When a mount process dies under its mount: noticing it, naming what it strands, recording it.

A FUSE connection lives as long as an fd to /dev/fuse is open. The mount process holds the only
one, so when it dies (OOM killer, a bug, kill -9) the kernel aborts the connection: every mount
of it (the layer's mountpoint, and the overlays of running containers that stack on it) answers
ENOTCONN for good. A new mount process serves new containers, but nothing can reconnect the old
overlays (docs/how-it-works.md, "When a mount process dies", says why and what it would take).

So the daemon follows each mount process through a pidfd (DeathWatch, one thread for all), and
on a death (the pidfd turns readable and the mount answers ENOTCONN) the supervisor:
- names the containers stranded on the dead connection (overlays_using: overlay mounts with the
  layer as a lowerdir, and bind mounts of it, from /proc/self/mountinfo), in a loud log line;
- appends a Death to <mountpoint>.lazysnap-deaths.json (read by `lazysnap status` and the
  metrics, which show the stranded containers that are still there);
- starts a new mount process on the same spec for new containers.
Standard library only: `lazysnap status` imports this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.private_files import replace_private
from snapshotter.sidecars import DEATHS_SUFFIX, deaths_path, mountpoints_with

log = logging.getLogger("lazysnap.fs")

KEPT_DEATHS = 10  # the record keeps the count, and the last few deaths in full
MOUNTINFO = "/proc/self/mountinfo"
# containerd's shim puts a task's rootfs at <state>/io.containerd.runtime.v2.task/<ns>/<id>/rootfs
_TASK_ROOTFS = re.compile(r"io\.containerd\.runtime\.v2\.task/(?P<ns>[^/]+)/(?P<id>[^/]+)/rootfs$")
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the fields used here."""

    mount_id: int
    device: str  # "major:minor"
    target: str
    fstype: str
    super_options: str

    @classmethod
    def parse(cls, line: str) -> MountEntry | None:
        fields = line.split()
        try:
            dash = fields.index("-")
            return cls(
                mount_id=int(fields[0]),
                device=fields[2],
                target=_unescape(fields[4]),
                fstype=fields[dash + 1],
                super_options=_unescape(fields[dash + 3]) if len(fields) > dash + 3 else "",
            )
        except (ValueError, IndexError):
            return None

    def lowerdirs(self) -> list[str]:
        for option in self.super_options.split(","):
            if option.startswith("lowerdir="):
                return [d for d in option.removeprefix("lowerdir=").split(":") if d]
        return []


@dataclass(frozen=True)
class Stranded:
    """A mount still on a dead FUSE connection: a container's rootfs, usually."""

    mount_id: int
    target: str
    container: str  # "<namespace>/<id>" for a containerd task's rootfs, else ""

    def name(self) -> str:
        return self.container or self.target


@dataclass(frozen=True)
class Death:
    pid: int
    noticed_at: float  # time.time()
    layer_digest: str
    stranded: tuple[Stranded, ...] = ()
    restarted: bool = False  # a new mount process was started for new containers

    @classmethod
    def from_json(cls, obj: Any) -> Death | None:
        if not isinstance(obj, dict):
            return None
        try:
            stranded = tuple(
                Stranded(int(s["mount_id"]), str(s["target"]), str(s.get("container", "")))
                for s in obj.get("stranded", [])
            )
            return cls(
                pid=int(obj["pid"]),
                noticed_at=float(obj["noticed_at"]),
                layer_digest=str(obj.get("layer_digest", "")),
                stranded=stranded,
                restarted=bool(obj.get("restarted", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class DeathRecord:
    count: int = 0
    last: tuple[Death, ...] = field(default_factory=tuple)  # oldest first, at most KEPT_DEATHS

    def stranded_now(self, mounts: Iterable[MountEntry]) -> list[Stranded]:
        """The recorded stranded mounts that are still there (same mount id and path): the
        containers that still have to be restarted."""
        present = {(m.mount_id, m.target) for m in mounts}
        seen: set[tuple[int, str]] = set()
        found = []
        for death in self.last:
            for s in death.stranded:
                key = (s.mount_id, s.target)
                if key in present and key not in seen:
                    seen.add(key)
                    found.append(s)
        return found


def read_record(mountpoint: str) -> DeathRecord:
    try:
        data = json.loads(deaths_path(mountpoint).read_text())
    except (OSError, ValueError):
        return DeathRecord()
    if not isinstance(data, dict):
        return DeathRecord()
    deaths = tuple(d for d in map(Death.from_json, data.get("last", [])) if d is not None)
    count = data.get("count")
    return DeathRecord(count if isinstance(count, int) else len(deaths), deaths)


def append_death(mountpoint: str, death: Death) -> DeathRecord:
    """Add death to the mountpoint's record (written atomically); the new record."""
    old = read_record(mountpoint)
    record = DeathRecord(old.count + 1, (*old.last, death)[-KEPT_DEATHS:])
    path = deaths_path(mountpoint)
    data = {"count": record.count, "last": [asdict(d) for d in record.last]}
    try:
        replace_private(path, (json.dumps(data, indent=1) + "\n").encode())
    except OSError as exc:
        log.warning("cannot record the death in %s: %s", path, exc)
    return record


def records_under(snapshots_dir: str) -> dict[str, DeathRecord]:
    """mountpoint -> its death record, for every record in <snapshots_dir>/<id>/."""
    return {
        mountpoint: read_record(mountpoint)
        for mountpoint in mountpoints_with(snapshots_dir, DEATHS_SUFFIX)
    }


def mount_table(path: str = MOUNTINFO) -> list[MountEntry]:
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    return [e for e in map(MountEntry.parse, text.splitlines()) if e is not None]


def overlays_using(mountpoint: str, mounts: list[MountEntry]) -> list[Stranded]:
    """The mounts that read through the FUSE mount at mountpoint: overlays with it as a
    lowerdir and other mounts of the same device (bind mounts). containerd writes lowerdirs
    relative to the snapshots directory when the option string would not fit a page (images of
    very many layers): such a "<id>/fs" is matched by suffix, so it may also name a container
    of another snapshotter whose snapshot has the same id (rare; worth a look, never harmful)."""
    mountpoint = mountpoint.rstrip("/")
    own = [m for m in mounts if m.target == mountpoint and m.fstype.startswith("fuse")]
    devices = {m.device for m in own}
    own_ids = {m.mount_id for m in own}
    found = []
    for m in mounts:
        if m.mount_id in own_ids:
            continue
        uses = m.device in devices
        if m.fstype == "overlay":
            uses = any(_same_dir(d, mountpoint) for d in m.lowerdirs())
        if uses:
            found.append(Stranded(m.mount_id, m.target, _container_of(m.target)))
    return found


class DeathWatch:
    """Follows mount processes through pidfds on one thread; calls on_death(mountpoint, pid)
    there when one exits. A followed process that exits because it was told to (unmount) is
    forgotten first by the caller; the callback decides what an exit means. Only the thread
    closes pidfds (one closed under its poll() could be reused by another file meanwhile)."""

    def __init__(self, on_death: Callable[[str, int], None]) -> None:
        self._on_death = on_death
        self._followed: dict[str, tuple[int, int]] = {}  # mountpoint -> (pid, pidfd)
        self._retired: list[int] = []  # pidfds no longer followed, for the thread to close
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    def follow(self, mountpoint: str, pid: int) -> None:
        """Watch pid as the mount process of mountpoint (replacing an earlier one)."""
        with self._lock:
            if self._closed or self._followed.get(mountpoint, (0, -1))[0] == pid:
                return
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # gone already: the next check() of the layer sees it
                return
            self._retire(mountpoint)
            self._followed[mountpoint] = (pid, pidfd)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mount-process deaths", daemon=True
                )
                self._thread.start()
            self._wake()  # under the lock: close() cannot have let the thread close the pipe

    def forget(self, mountpoint: str) -> None:
        with self._lock:
            if self._closed or mountpoint not in self._followed:
                return  # (once closed, the thread may have closed the wake pipe)
            self._retire(mountpoint)
            self._wake()

    def followed(self, mountpoint: str) -> int | None:
        with self._lock:
            entry = self._followed.get(mountpoint)
        return entry[0] if entry else None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for mountpoint in list(self._followed):
                self._retire(mountpoint)
            if self._thread is not None:
                self._wake()  # the thread closes the pipe on its way out
                return
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _retire(self, mountpoint: str) -> None:
        old = self._followed.pop(mountpoint, None)
        if old is not None:
            self._retired.append(old[1])

    def _wake(self) -> None:  # called holding the lock, never once closed (see close())
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"w")

    def _run(self) -> None:
        while True:
            with self._lock:
                for pidfd in self._retired:
                    os.close(pidfd)
                self._retired.clear()
                if self._closed:
                    break
                by_fd = {fd: (mp, pid) for mp, (pid, fd) in self._followed.items()}
            poller = select.poll()
            poller.register(self._wake_read, select.POLLIN)
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    continue
                mountpoint, pid = by_fd[fd]
                with self._lock:
                    if self._followed.get(mountpoint) != (pid, fd):
                        continue  # forgotten meanwhile: not a death to report
                    self._retire(mountpoint)
                try:
                    self._on_death(mountpoint, pid)
                except Exception:  # the watch must outlive any one layer's surprise
                    log.exception("handling the exit of mount process %d (%s)", pid, mountpoint)
        os.close(self._wake_read)
        os.close(self._wake_write)


def _same_dir(lowerdir: str, mountpoint: str) -> bool:
    lowerdir = lowerdir.rstrip("/")
    if lowerdir.startswith("/"):
        return lowerdir == mountpoint
    return mountpoint.endswith("/" + lowerdir)


def _container_of(target: str) -> str:
    match = _TASK_ROOTFS.search(target)
    return f"{match['ns']}/{match['id']}" if match else ""


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)
