"""The daemon's mount processes: starting them, waiting for them to be ready, adopting the ones
a previous daemon started, following them to their death, and stopping them.

Each layer is served by its own mount process (snapshotter.fs.mount_process), started in its
own session so that it survives restarts of `lazysnap serve` (starter.py). start() returns at
once; a thread per startup waits for the process's ready line (or its error, its exit, or
ready_timeout) and tells the observers registered through on_settled() how it ended, holding
no lock meanwhile. await_startup() is where a caller waits for it.

A mount process that is live after a restart of the daemon is recognised through its state
file and /proc (mount_checks.py) and followed like one started here. A followed process that
dies under a mount that was not detached on purpose strands the containers reading through
it (deaths.py): the death is recorded and logged with the containers it strands, and a new
process is started on the same spec for new containers, at most once per
RESTART_MIN_INTERVAL_S per mountpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter import sidecars
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.lazylayers.deaths import (
    Death,
    DeathWatch,
    append_death,
    mount_table,
    overlays_using,
)
from snapshotter.lazylayers.mount_checks import (
    ABSENT,
    DEAD,
    detach,
    is_mount_process,
    mount_problem,
    mount_status,
)
from snapshotter.lazylayers.starter import (
    MountChild,
    MountStarter,
    close_child,
    death_note,
    exit_note,
    signal_child,
)
from snapshotter.remote.session_credentials import SessionCredentials

log = logging.getLogger("lazysnap.fs")

STOP_TIMEOUT_S = 10.0
# How long the ready-line wait blocks at a time before it looks at the clock again.
READY_POLL_S = 0.25
LOG_TAIL_BYTES = 2000
# A mount process that dies again this soon after being restarted is left for the next check().
RESTART_MIN_INTERVAL_S = 60.0

# Told how a mount settled: None once it is live (or local), else what check() would raise.
SettledCallback = Callable[[RemoteLayerUnavailable | None], None]


@dataclass
class _Startup:
    """A mount process that was started and has not yet said whether it is ready."""

    child: MountChild
    log_path: Path
    started: float
    done: threading.Event
    problem: str | None = None  # why it is not ready, once done; None = ready
    observers: list[SettledCallback] = field(default_factory=list)  # on_settled(), until done


class MountSupervisor:
    def __init__(
        self,
        python: str,
        *,
        ready_timeout: float,
        zygote: bool,
        session_credentials: SessionCredentials | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """clock: what startup waits, restart intervals and death records go by."""
        self.ready_timeout = ready_timeout
        self._clock = clock
        self.starter = MountStarter(python, zygote=zygote, session_credentials=session_credentials)
        self._children: dict[str, MountChild] = {}
        self._startups: dict[str, _Startup] = {}
        self._mount_locks: dict[str, threading.RLock] = {}  # one mount/startup at a time
        self._lock = threading.Lock()  # guards the dicts
        # Mount processes followed through pidfds: a death is reported and the process restarted.
        self._deaths = DeathWatch(self._mount_process_died)
        self._restarted: dict[str, float] = {}  # mountpoint -> when its process was restarted
        self._reported_deaths: dict[str, int] = {}  # mountpoint -> pid whose death was reported

    def close(self) -> None:
        """Stop the zygote and the death watch (mount processes live on, as after the daemon
        exits)."""
        self._deaths.close()
        self.starter.close()

    def mount_lock(self, mountpoint: str) -> threading.RLock:
        """Held while mountpoint is mounted, waited for, restarted or stopped."""
        with self._lock:
            return self._mount_locks.setdefault(mountpoint, threading.RLock())

    def child(self, mountpoint: str) -> MountChild | None:
        """The mount process this supervisor started for mountpoint, if it still has it."""
        with self._lock:
            return self._children.get(mountpoint)

    def mountpoints(self) -> list[str]:
        """The mountpoints whose mount process this supervisor started and still holds."""
        with self._lock:
            return sorted(self._children)

    # -- starting ----------------------------------------------------------------------------------

    def start(self, mountpoint: str, spec_path: Path) -> None:
        """Start the mount process; a thread waits for its ready line (see await_startup)."""
        read_end, write_end = os.pipe()
        log_path = sidecars.log_path(mountpoint)
        try:
            child = self.starter.start(spec_path, write_end, log_path)
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            raise RemoteLayerUnavailable(
                f"starting mount process for {mountpoint}: {exc}", FallbackReason.MOUNT
            ) from exc
        os.close(write_end)
        startup = _Startup(child, log_path, self._clock.monotonic(), threading.Event())
        with self._lock:
            self._children[mountpoint] = child
            self._startups[mountpoint] = startup
        threading.Thread(
            target=self._watch_startup,
            args=(mountpoint, startup, read_end),
            name=f"mount-startup {mountpoint}",
            daemon=True,
        ).start()

    def await_startup(self, mountpoint: str) -> str | None:
        """Wait for the startup of mountpoint, if one is in progress; why it failed, or None
        (ready, or nothing was starting). The caller holds mount_lock(mountpoint) and cleans a
        failed startup away."""
        with self._lock:
            startup = self._startups.get(mountpoint)
        if startup is None:
            return None
        # The watcher gives up after ready_timeout; the margin covers its own scheduling.
        waiting_since = self._clock.monotonic()
        if not startup.done.is_set():
            self._clock.wait(startup.done, self.ready_timeout + 5)
            log.info(
                "waited %.2fs for lazy layer at %s to mount",
                self._clock.monotonic() - waiting_since,
                mountpoint,
            )
        with self._lock:
            self._startups.pop(mountpoint, None)
        if startup.problem is None and not startup.done.is_set():
            return f"mounting lazy layer at {mountpoint}: no answer from the mount process"
        return startup.problem

    def startup_settled(self, mountpoint: str) -> bool:
        """False while mountpoint's process is starting or after its startup failed (check()
        cleans that away); a ready startup nobody waited for is forgotten here."""
        with self._lock:
            startup = self._startups.get(mountpoint)
            if startup is None:
                return True
            if not startup.done.is_set() or startup.problem is not None:
                return False
            del self._startups[mountpoint]
            return True

    def on_settled(self, mountpoint: str, callback: SettledCallback) -> None:
        """Call callback once the mount at mountpoint is live or has failed: with None, or with
        the RemoteLayerUnavailable check() would raise. A mount still starting is reported from
        its startup watcher's thread, any other at once. Nothing waits and no lock is held
        meanwhile (check() holds the mountpoint's lock while it waits, so an observer calling it
        would delay everything else done to the layer); a failed mount is left for check()."""
        with self._lock:
            startup = self._startups.get(mountpoint)
            if startup is not None and not startup.done.is_set():
                startup.observers.append(callback)
                return
        if startup is not None:
            outcome = _startup_outcome(startup)
        elif sidecars.read_marker(mountpoint) is not None:
            outcome = None
        else:
            problem = mount_problem(mountpoint)
            why = f"lazy layer at {mountpoint}: {problem}"
            outcome = RemoteLayerUnavailable(why, FallbackReason.MOUNT) if problem else None
        _notify(callback, mountpoint, outcome)

    def _watch_startup(self, mountpoint: str, startup: _Startup, read_end: int) -> None:
        try:
            answer = _read_line(read_end, self.ready_timeout, self._clock)
        finally:
            os.close(read_end)
        if answer == "ready":
            log.info(
                "lazy layer at %s ready after %.2fs",
                mountpoint,
                self._clock.monotonic() - startup.started,
            )
            self._deaths.follow(mountpoint, startup.child.pid)
        else:
            if answer is None:
                why = f"not ready within {self.ready_timeout:g}s"
            elif answer == "":
                why = f"mount process exited{exit_note(startup.child)} before it was ready"
            else:
                why = answer.removeprefix("error: ")
            tail = _tail(startup.log_path)
            startup.problem = f"mounting lazy layer at {mountpoint}: {why}" + (
                f"; log: {tail}" if tail else ""
            )
            log.warning("%s", startup.problem)
        with self._lock:  # on_settled() looks at done and observers under the same lock
            startup.done.set()
            observers, startup.observers = startup.observers, []
        outcome = _startup_outcome(startup)
        for callback in observers:
            _notify(callback, mountpoint, outcome)

    # -- stopping ----------------------------------------------------------------------------------

    def forget(self, mountpoint: str) -> None:
        """mountpoint's process is about to be told to end: that is no death to report."""
        self._deaths.forget(mountpoint)
        with self._lock:
            self._reported_deaths.pop(mountpoint, None)

    def stop(self, mountpoint: str) -> None:
        """End mountpoint's mount process (TERM, then KILL) and detach its mount."""
        pid = sidecars.state_pid(sidecars.read_state(mountpoint))
        with self._lock:
            child = self._children.pop(mountpoint, None)
            self._startups.pop(mountpoint, None)
        if child is not None:
            pid = child.pid
        if pid is not None and is_mount_process(pid):
            signal_child(pid, child, signal.SIGTERM)
            _wait_exit(pid, child, STOP_TIMEOUT_S)
        if mount_status(mountpoint) != ABSENT:
            detach(mountpoint)
        if pid is not None and is_mount_process(pid):
            signal_child(pid, child, signal.SIGKILL)
            _wait_exit(pid, child, STOP_TIMEOUT_S)
        close_child(child)

    def reap_detached_children(self) -> None:
        """Collect the exit of mount processes whose layer went local (they end once the last
        container using the detached mount is gone), so no zombie lingers."""
        with self._lock:
            children = list(self._children.items())
        for mountpoint, child in children:
            if child.poll() is not None and sidecars.read_marker(mountpoint) is not None:
                with self._lock:
                    if self._children.get(mountpoint) is not child:
                        continue
                    del self._children[mountpoint]
                close_child(child)

    # -- deaths (deaths.py) ------------------------------------------------------------------------

    def follow(self, mountpoint: str) -> None:
        """Follow the live mount process of mountpoint (from its state file) for its death."""
        pid = sidecars.state_pid(sidecars.read_state(mountpoint))
        if pid is not None and self._deaths.followed(mountpoint) != pid:
            self._deaths.follow(mountpoint, pid)

    def report_late_death(self, mountpoint: str) -> None:
        """check() found the mount dead without the watch having reported it (the process died
        while the daemon was down): report it now; the caller mounts the layer again."""
        with self.mount_lock(mountpoint):
            pid = sidecars.state_pid(sidecars.read_state(mountpoint))
            if pid is not None and mount_status(mountpoint) == DEAD:
                self._report_death(mountpoint, pid, " (while the daemon was not watching)", False)

    def _mount_process_died(self, mountpoint: str, pid: int) -> None:
        """A followed mount process exited without being told to. If its mount is dead (not
        detached on purpose), name the containers it strands, record it, restart the process."""
        with self.mount_lock(mountpoint):
            with self._lock:
                child = self._children.get(mountpoint)
                ours = child is not None and child.pid == pid
                if ours:
                    del self._children[mountpoint]
            note = death_note(child) if child is not None and ours else ""
            if ours:
                close_child(child)
            if sidecars.read_marker(mountpoint) is not None or mount_status(mountpoint) != DEAD:
                log.info("mount process %d of %s exited%s", pid, mountpoint, note)
                return
            with self._lock:
                now = self._clock.monotonic()
                # Only restarts within the interval matter: forget older ones (bounded).
                self._restarted = {
                    path: when
                    for path, when in self._restarted.items()
                    if now - when < RESTART_MIN_INTERVAL_S
                }
                restart = mountpoint not in self._restarted
                if restart:
                    self._restarted[mountpoint] = now
            self._report_death(mountpoint, pid, note, restart)
            if not restart:
                log.warning(
                    "mount process of %s died again within %.0fs of its restart: not restarting "
                    "it now; the next container using the layer mounts it again",
                    mountpoint,
                    RESTART_MIN_INTERVAL_S,
                )
                return
            spec_path = sidecars.spec_path(mountpoint)
            if not spec_path.exists():
                return  # being unmounted (its snapshot removed): nothing to serve any more
            verdict = sidecars.read_verdict(mountpoint)
            if verdict is not None and verdict.failed:
                log.warning(
                    "not restarting the mount process of %s: its index failed the completion "
                    "check (the layer is refused on this node)",
                    mountpoint,
                )
                return
            detach(mountpoint)  # the stranded mounts keep their own reference to it
            try:
                self.start(mountpoint, spec_path)
            except RemoteLayerUnavailable as exc:
                log.error("restarting the mount process of %s: %s", mountpoint, exc)
                return
            log.warning("started a new mount process for %s (for new containers)", mountpoint)

    def _report_death(self, mountpoint: str, pid: int, note: str, restart: bool) -> None:
        """Log and record the death of pid under mountpoint, once per pid."""
        with self._lock:
            if self._reported_deaths.get(mountpoint) == pid:
                return
            self._reported_deaths[mountpoint] = pid
        state = sidecars.read_state(mountpoint) or {}
        digest = str(state.get("layer_digest") or "?")
        stranded = overlays_using(mountpoint, mount_table())
        append_death(mountpoint, Death(pid, self._clock.time(), digest, tuple(stranded), restart))
        log.error(
            "mount process %d of lazy layer %s at %s died%s: its FUSE connection is gone. "
            "%d mount(s) still read through it and get ENOTCONN until they are restarted "
            "(no new process can take over a dead connection): %s",
            pid,
            digest,
            mountpoint,
            note,
            len(stranded),
            ", ".join(s.name() for s in stranded) or "none found",
        )


def _startup_outcome(startup: _Startup) -> RemoteLayerUnavailable | None:
    return (
        None
        if startup.problem is None
        else RemoteLayerUnavailable(startup.problem, FallbackReason.MOUNT)
    )


def _notify(
    callback: SettledCallback, mountpoint: str, outcome: RemoteLayerUnavailable | None
) -> None:
    try:
        callback(outcome)
    except Exception:  # an observer's bug must not end the startup watcher
        log.exception("on_settled observer of %s failed", mountpoint)


def _wait_exit(pid: int, child: MountChild | None, timeout: float) -> None:
    """Wait up to timeout for pid to end, in real time: another process's exit, which no
    clock of ours moves. An adopted process counts as ended once its main thread is (a zombie
    leader), as is_mount_process says; its pidfd would wait for every thread."""
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
        return
    deadline = time.monotonic() + timeout
    while is_mount_process(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _read_line(fd: int, timeout: float, clock: Clock) -> str | None:
    """The first line on fd; "" at EOF without one; None once timeout seconds of clock
    passed (looked at every READY_POLL_S of real time: the pipe is no Event to wait on)."""
    deadline = clock.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(remaining, READY_POLL_S))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace").strip()


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])
