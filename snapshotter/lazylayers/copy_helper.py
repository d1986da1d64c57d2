"""Materialize a lazy layer: copy what its FUSE mount serves into the plain directory under it.

Once background fetch has every span of a layer in the cache, FUSE only costs: its page cache
reads reach about half of overlayfs over ext4, and every new container pays FUSE directory
operations. So the materializer copies the layer's tree into the *underlying* directory of its
mountpoint (the empty snapshots/<id>/fs the FUSE mount sits on), writes a marker, and lazily
detaches the FUSE mount: containers started afterwards get plain ext4 files, containers
already running keep the detached FUSE mount alive until they exit.

Files beside the mountpoint (their names and formats: snapshotter/sidecars.py):
    <mountpoint>.lazysnap-local   the marker: written atomically, fsynced, as the LAST step, so
                                  it exists only over a complete, synced copy
    <mountpoint>.lazysnap-bind    an empty directory; the copy helper binds the snapshot dir on it
                                  in its own mount namespace (invisible to everyone else, gone
                                  with the helper, however it ends) and holds a flock on it, so
                                  two helpers never write the same tree

The copy is GNU `cp -a` (whiteouts are 0/0 character devices, opaque dirs carry
trusted.overlay.opaque; hardlinks, xattrs, owners, modes and times are kept), run by a helper
process (`python -m snapshotter.lazylayers.copy_helper copy MOUNTPOINT`) under unshare, nice 19
and the idle I/O class (fs/low_priority.py). It yields to a container that starts meanwhile:
its watchdog stops cp (SIGSTOP) while the node's busy gate (fs/activity.py, from the cache
directory and quiet period in the layer's mount spec) says wait and lets it go on (SIGCONT)
after, and the final sync, which is when most of the copy reaches the disk, waits for a quiet
node too. It wipes the underlying directory first (what a crashed copy left) and again when cp
fails, so a half-copied tree is never left, and never visible: it sits under the FUSE mount.
Without the marker, anything in the underlying directory is such a leftover.

Bounds: before copying, the helper reads the layer's index (through the mount's spec) and
refuses a layer whose regular files (one per name, hardlinks once) add up to more than its
uncompressed size: entries that alias one file's data would make cp write many times the layer
(EXIT_NEVER: no retry helps). It also refuses when the files would not leave the disk reserve
free on the target's filesystem. cp then runs under a watchdog that kills it once it has
written (/proc/<pid>/io wchar: every write, copy_file_range and sendfile) more than those bytes,
or once the filesystem's free space falls under the reserve (someone else is filling it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.disk_reserve import NO_RESERVE, DiskReserve, disk_space
from snapshotter.fs.low_priority import HELPER_PREFIX
from snapshotter.fs.mount_spec import MountSpec, SpecError
from snapshotter.index.model import EntryType, LayerIndex
from snapshotter.lazylayers.helper_process import CancellableProcess, HelperCancelled
from snapshotter.sidecars import bind_path, spec_path
from snapshotter.tree_removal import clear_directory

HELPER_MODULE = "snapshotter.lazylayers.copy_helper"
NAMESPACE = ("unshare", "--mount", "--propagation", "private")
CP = ("cp", "-a", "--preserve=xattr", "--no-target-directory")  # explicit xattr: failures count
EXIT_BUSY = 3  # another helper holds the flock on this layer
EXIT_NEVER = 4  # the layer cannot be copied whatever is retried (its index does not allow it)
WATCH_INTERVAL_S = 0.05  # also how soon cp is stopped once a container starts
# Room per file and directory beyond its bytes (inode, directory entry, a partial block).
ENTRY_OVERHEAD_BYTES = 4096


class MaterializeError(Exception):
    """The copy did not complete; the message names the layer's mountpoint and the cause.
    permanent: trying again cannot help (the index does not allow a bounded copy)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class CopyBudget:
    """What a copy of a layer may write: its regular files' bytes, and with each entry's
    overhead, the room it needs on the target's filesystem."""

    file_bytes: int
    room_bytes: int
    layer_bytes: int  # the uncompressed layer (the tar stream), from the index


def copy_budget(index: LayerIndex) -> CopyBudget:
    """The budget for copying the tree built from index: the last entry of a name wins (as in
    the tree), hardlinks share their target's data."""
    last = {entry.name: entry for entry in index.entries}
    file_bytes = sum(e.size for e in last.values() if e.type is EntryType.REG)
    room = file_bytes + ENTRY_OVERHEAD_BYTES * len(last)
    return CopyBudget(file_bytes, room, index.uncompressed_size)


def wipe_contents(directory: Path) -> int:
    """Remove everything inside directory (not the directory itself); returns the number of
    top-level entries removed. Only for a plain directory: the caller makes sure no mount
    sits on it."""
    with os.scandir(directory) as entries:
        removed = sum(1 for _ in entries)
    clear_directory(directory)  # any depth: a crafted layer may nest thousands of directories
    return removed


def plain_directory_on_parent_fs(path: str) -> bool:
    """True if path is a directory on the same filesystem as its parent (nothing mounted on
    it): the only kind of directory a wipe may touch."""
    try:
        own = os.stat(path, follow_symlinks=False)
        parent = os.stat(os.path.dirname(path.rstrip("/")) or "/")
    except OSError:
        return False
    return os.path.isdir(path) and not os.path.islink(path) and own.st_dev == parent.st_dev


class Copy:
    """One run of the copy helper for one mountpoint; cancel() from another thread ends it.
    reserve: the free space the copy leaves on the target's filesystem."""

    def __init__(
        self,
        mountpoint: str,
        *,
        python: str = sys.executable,
        reserve: DiskReserve = NO_RESERVE,
    ) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.python = python
        self.reserve = reserve
        self._process = CancellableProcess()

    @property
    def cancelled(self) -> bool:
        return self._process.cancelled

    def command(self) -> list[str]:
        return [
            *HELPER_PREFIX,  # the copy reads the span cache and writes the containers' disk
            *NAMESPACE,
            self.python,
            "-m",
            HELPER_MODULE,
            "copy",
            "--min-free-bytes",
            str(self.reserve.min_free_bytes),
            "--min-free-percent",
            str(self.reserve.min_free_percent),
            self.mountpoint,
        ]

    def run(self) -> None:
        """Copy the tree the mount serves into its underlying directory and sync it; raises
        MaterializeError (the underlying directory is then empty again)."""
        try:
            finished = self._process.run(self.command())
        except HelperCancelled:
            raise MaterializeError(f"copy of {self.mountpoint}: cancelled") from None
        except OSError as exc:
            raise MaterializeError(
                f"starting the copy helper for {self.mountpoint}: {exc}"
            ) from exc
        if finished.returncode == EXIT_BUSY:
            raise MaterializeError(f"copy of {self.mountpoint}: another copy is running")
        if finished.returncode != 0:
            raise MaterializeError(
                finished.last_error_line(), permanent=finished.returncode == EXIT_NEVER
            )

    def cancel(self) -> None:
        """End the helper (and its cp) and wait for it. The partial copy stays under the FUSE
        mount, hidden; the next copy, or the next mount of the layer, wipes it."""
        self._process.cancel()


# -- the helper: runs in its own mount namespace ---------------------------------------------------


class _HelperError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise _HelperError(f"{command[0]}: {exc.strerror}") from exc


def _first_lines(text: str, count: int = 2) -> str:
    lines = [line for line in text.strip().splitlines() if line]
    more = f" (+{len(lines) - count} more lines)" if len(lines) > count else ""
    return " | ".join(lines[:count]) + more


def _budget_for(mountpoint: str) -> CopyBudget:
    """The copy budget from the index the mount serves (its spec names the index file)."""
    spec_file = spec_path(mountpoint)
    try:
        index_path = json.loads(spec_file.read_text())["index_path"]
        data = Path(index_path).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _HelperError(f"reading the layer's index through {spec_file}: {exc}") from None
    from snapshotter.index.codec import decode_index

    try:
        index = decode_index(data)
    except Exception as exc:  # the codec's errors name what is wrong
        raise _HelperError(f"index {index_path}: {exc}") from None
    budget = copy_budget(index)
    if budget.file_bytes > budget.layer_bytes:
        raise _HelperError(
            f"its files add up to {budget.file_bytes} bytes, more than the layer's "
            f"{budget.layer_bytes} uncompressed bytes (index entries share data): a copy "
            "would write more than the layer holds; it stays on FUSE",
            permanent=True,
        )
    return budget


def _check_room(target: Path, budget: CopyBudget, reserve: DiskReserve) -> int:
    """The free space under which the copy is stopped; _HelperError if it cannot fit."""
    space = disk_space(target)
    keep = reserve.bytes_for(space.total)
    if space.free - budget.room_bytes < keep:
        raise _HelperError(
            f"needs {budget.room_bytes >> 20} MiB on the filesystem of {target}, which has "
            f"{space.free >> 20} MiB free and keeps {keep >> 20} MiB free for containers "
            "([cache] min_free_bytes / min_free_percent): free space there"
        )
    return keep


def _written(pid: int) -> int:
    """Bytes process pid has written (write, copy_file_range, sendfile): /proc/<pid>/io."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _run_bounded(
    command: list[str],
    target: Path,
    max_bytes: int,
    keep_free: int,
    node_busy: Callable[[], bool] = lambda: False,
) -> str:
    """Run cp; kill it once it wrote more than max_bytes or the filesystem of target has less
    than keep_free left; stop it (SIGSTOP) while node_busy() and let it go on after. "" if it
    ended by itself, else why it was stopped."""
    try:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise _HelperError(f"{command[0]}: {exc.strerror}") from exc
    stopped = ""
    paused = False
    ended = _exit_waiter(child)
    while True:
        if ended(WATCH_INTERVAL_S):
            break
        if node_busy() != paused:
            paused = not paused
            child.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)
        written = _written(child.pid)
        if written > max_bytes:
            stopped = (
                f"cp wrote {written} bytes, more than the layer's files ({max_bytes}): stopped"
            )
        elif disk_space(target).free < keep_free:
            stopped = (
                f"the filesystem of {target} fell under the {keep_free >> 20} MiB kept free "
                "for containers during the copy: stopped ([cache] min_free_bytes / "
                "min_free_percent)"
            )
        if stopped:
            child.kill()  # SIGKILL ends a stopped process too
            ended(None)  # and the waiter lets go of its pidfd
            break
    child.wait()
    assert child.stderr is not None
    errors = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if not stopped and child.returncode != 0:
        stopped = f"cp failed (exit {child.returncode}): {_first_lines(errors)}"
    return stopped


def _exit_waiter(child: subprocess.Popen[bytes]) -> Callable[[float | None], bool]:
    """A wait for child's exit of at most some seconds (None: until it ends), True once it
    ended: one wake-up per call through a pidfd (Popen.wait(timeout) polls every few ms: CPU
    the node's next start could use)."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except (OSError, AttributeError):  # an old kernel: Popen's own polling wait

        def polled(seconds: float | None) -> bool:
            try:
                child.wait(seconds)
            except subprocess.TimeoutExpired:
                return False
            return True

        return polled

    def waited(seconds: float | None) -> bool:
        readable, _, _ = select.select([pidfd], [], [], seconds)
        if readable or child.poll() is not None:
            os.close(pidfd)
            return True
        return False

    return waited


def _busy_gate(mountpoint: str, clock: Clock) -> BusyGate:
    """The node's busy gate, as the layer's mount process sees it (its spec's cache directory
    and quiet period)."""
    try:
        spec = MountSpec.load(str(spec_path(mountpoint)))
    except SpecError as exc:
        raise _HelperError(str(exc)) from None
    activity = NodeActivity(spec.cache_dir, clock)
    return BusyGate(activity, spec.background_quiet_seconds, fetches=True)


def _copy_in_namespace(mountpoint: str, reserve: DiskReserve = NO_RESERVE) -> None:
    """Bind the snapshot dir (non-recursively: its FUSE submount is not carried over) so that
    <bind>/<name> is the underlying directory, wipe it, cp -a the mount into it, sync it."""
    snapshot_dir, name = os.path.split(mountpoint.rstrip("/"))
    bind = bind_path(mountpoint)
    try:
        bind.mkdir(mode=0o700, exist_ok=True)
        lock_fd = os.open(bind, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _HelperError(f"{bind}: {exc.strerror}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)  # the holder keeps its directory: removing it would end its bind
        raise SystemExit(EXIT_BUSY) from None
    try:
        mounted = _run(["mount", "--bind", snapshot_dir, str(bind)])
        if mounted.returncode != 0:
            raise _HelperError(f"bind mount of {snapshot_dir}: {_first_lines(mounted.stderr)}")
        try:
            _copy_into(mountpoint, bind / name, reserve, _busy_gate(mountpoint, SYSTEM_CLOCK))
        finally:
            _run(["umount", str(bind)])
    finally:
        os.close(lock_fd)
        with contextlib.suppress(OSError):
            bind.rmdir()


def _copy_into(
    mountpoint: str,
    target: Path,
    reserve: DiskReserve = NO_RESERVE,
    gate: BusyGate | None = None,
) -> None:
    if not plain_directory_on_parent_fs(str(target)):
        raise _HelperError(f"{target} is not the plain directory under {mountpoint}")
    if os.stat(mountpoint).st_dev == os.stat(target).st_dev:
        raise _HelperError(f"{mountpoint} is not mounted: nothing to copy from")
    budget = _budget_for(mountpoint)
    try:
        wipe_contents(target)
        keep_free = _check_room(target, budget, reserve)
        # xattrs and symlink targets are not counted by wchar; the overhead covers them.
        stopped = _run_bounded(
            [*CP, "--", mountpoint, str(target)],
            target,
            budget.room_bytes,
            keep_free,
            (lambda: gate.remaining() > 0) if gate else lambda: False,
        )
        if stopped:
            raise _HelperError(stopped)
        if gate is not None:  # the dirty pages go to disk now: not while a container starts
            gate.pause_while_busy(threading.Event())
        synced = _run(["sync", "-f", str(target)])
        if synced.returncode != 0:
            raise _HelperError(f"sync -f {target}: {_first_lines(synced.stderr)}")
    except BaseException:
        with contextlib.suppress(OSError):
            wipe_contents(target)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {HELPER_MODULE}",
        description="Copy a lazy layer's FUSE mount into the directory under it (run by "
        "lazysnap serve inside `unshare --mount --propagation private`).",
    )
    parser.add_argument("action", choices=["copy"])
    parser.add_argument("--min-free-bytes", type=int, default=0)
    parser.add_argument("--min-free-percent", type=float, default=0.0)
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    try:
        reserve = DiskReserve(args.min_free_bytes, args.min_free_percent)
        _copy_in_namespace(os.path.abspath(args.mountpoint), reserve)
    except _HelperError as exc:
        print(f"materializing {args.mountpoint}: {exc}", file=sys.stderr)
        return EXIT_NEVER if exc.permanent else 1
    except CacheError as exc:
        print(f"materializing {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"materializing {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
