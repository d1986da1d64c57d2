"""The snapshot directories under ROOT/snapshots/ and the filesystem half of the core's crash
safety (core/snapshotter.py orders these steps around its metadata transactions):

- a new directory is built as new-XXXX/{fs,work} and renamed to <id>, the rename fsynced before
  the row that needs it commits (place);
- a directory no snapshot owns is renamed to rm-* while the metadata lock is held, then deleted
  at leisure (trash_orphans, empty_trash), so an id reused after a rolled-back create never has
  its fresh directory deleted;
- names an operation works on without the lock (a remote mount in progress, a deletion) are
  marked in flight, and trash_orphans leaves them alone;
- mounts left inside a directory are detached before it is deleted: the removal never crosses
  one.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable

from snapshotter.core import layout
from snapshotter.core.metadata import Kind
from snapshotter.core.mounts import detach_mount, mount_points_under
from snapshotter.tree_removal import remove_tree

log = logging.getLogger("lazysnap.core")


class SnapshotDirs:
    """ROOT/snapshots/ (created 0700) and its directories. Thread-safe."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.snapshots_dir = layout.snapshots_dir(root)
        try:
            os.mkdir(self.snapshots_dir, 0o700)
            os.chmod(self.snapshots_dir, 0o700)  # not the umask's choice
        except FileExistsError:
            pass
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    # -- paths -----------------------------------------------------------------------------

    def path(self, snapshot_id: int) -> str:
        return layout.snapshot_dir(self.root, snapshot_id)

    def upper(self, snapshot_id: int) -> str:
        return layout.upper_dir(self.root, snapshot_id)

    def work(self, snapshot_id: int) -> str:
        return os.path.join(self.path(snapshot_id), layout.WORK)

    # -- creating --------------------------------------------------------------------------

    def new(self, kind: Kind) -> str:
        """new-XXXX/{fs 0755, work 0711} with modes set explicitly (the umask may be 0)."""
        temp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
        try:
            upper = os.path.join(temp, "fs")
            os.mkdir(upper, 0o755)
            os.chmod(upper, 0o755)
            if kind is Kind.ACTIVE:
                work = os.path.join(temp, "work")
                os.mkdir(work, 0o711)
                os.chmod(work, 0o711)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp

    def place(self, temp: str, snapshot_id: int) -> None:
        """Rename a new directory to the snapshot's, on disk before the row that needs it."""
        final = self.path(snapshot_id)
        if os.path.lexists(final):
            # Left by a create whose transaction never committed, so its id came round again.
            log.warning("removing stale directory %s of an interrupted operation", final)
            self.delete(final)
        os.rename(temp, final)
        _fsync_dir(self.snapshots_dir)

    # -- in flight -------------------------------------------------------------------------

    def mark_in_flight(self, name: str) -> None:
        with self._in_flight_lock:
            self._in_flight.add(name)

    def unmark_in_flight(self, name: str) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(name)

    # -- garbage ---------------------------------------------------------------------------

    def trash_orphans(
        self, owned: set[str], unmount_remote: Callable[[str], None] | None
    ) -> list[str]:
        """Rename the entries of snapshots/ not in owned (nor in flight) to rm-*, unmounting a
        lazy layer left at one's fs/ through unmount_remote; call with the write lock held.
        The trash is in flight until empty_trash deleted it."""
        with self._in_flight_lock:
            busy = set(self._in_flight)
        trash = []
        for name in sorted(os.listdir(self.snapshots_dir)):
            if name in owned or name in busy:
                continue
            path = os.path.join(self.snapshots_dir, name)
            if unmount_remote is not None and mount_points_under(os.path.join(path, "fs")):
                unmount_remote(os.path.join(path, "fs"))
            if name.startswith("rm-"):
                doomed = path
            else:
                doomed = os.path.join(self.snapshots_dir, f"rm-{name}-{secrets.token_hex(4)}")
                try:
                    os.rename(path, doomed)
                except FileNotFoundError:
                    continue
            self.mark_in_flight(os.path.basename(doomed))
            trash.append(doomed)
        return trash

    def empty_trash(self, trash: list[str]) -> None:
        for path in trash:
            try:
                self.delete(path)
            finally:
                self.unmark_in_flight(os.path.basename(path))

    def delete(self, path: str) -> None:
        """Remove path; mounts left inside are detached first so the removal never crosses
        one. Failures are logged (Cleanup tries again), not raised."""
        for point in mount_points_under(path):
            try:
                detach_mount(point)
            except OSError as err:
                log.warning("%s; leaving %s in place", err, path)
                return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)  # shutil.rmtree recurses: a deep layer would never go
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("failed to remove directory %s: %s", path, err)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
