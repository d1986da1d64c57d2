"""LazyLayers: the RemoteLayers implementation that the snapshot core gets injected.

Each layer is served by its own mount process (snapshotter.fs.mount_process), started in its
own session so that it survives restarts of `lazysnap serve`. Beside the mountpoint live:
    <mountpoint>.lazysnap.json        state file written by the mount process (pid, digest, ...)
    <mountpoint>.lazysnap-spec.json   the spec the process was started with
    <mountpoint>.lazysnap-index       the encoded index, when the spec carried it as bytes
    <mountpoint>.lazysnap.log         the process's log (EIO lines name layer, span and cause)
    <mountpoint>.lazysnap-local       marker: the layer was copied into the directory under the
                                      mount and the FUSE mount detached (fs/materialize.py)
    <mountpoint>.lazysnap-check       the completion check's verdict (fs/refusals.py)
A mountpoint that is still live with a live process is re-attached, not mounted again.

A watcher thread first runs the completion check (fs/completion.py, in a helper process) on
each layer whose background fetch is complete, always: the layer's tar stream against its
diffID and its index's TOC. A pass is recorded; a failure refuses the index on this node for
good (verdict file, which makes the mount process fail every read with EIO; the node's ledger,
which discovery and mount_layer consult; the layer's spans evicted) and the layer is never
materialized. Only a layer that passed against a known diffID is materialized.

With materialize on, the watcher thread copies each layer whose background fetch is complete into
the plain directory under its mount, writes the marker, and lazily detaches the FUSE mount:
containers started afterwards read plain files; running ones keep the detached mount (and its
process) alive until they exit. A local layer is never mounted again (check() and a restart
take the marker as "live"); a failed copy is logged, wiped and tried again later, while FUSE
keeps serving, up to MATERIALIZE_MAX_ATTEMPTS times (once if the helper says no retry can help);
then the manager gives up and records why beside the mountpoint (status shows
"materialize failed: ..."; deleting that record makes it try again).

With mount_in_background (what the daemon uses), mount() returns once the process is started,
without waiting for it to be ready: the core then answers Prepare at once and the layers of an
image mount in parallel (otherwise mount() waits, as mount_layer does). check() is where a
starting mount is waited for (the core calls it before handing out a mount that uses the layer);
a mount that failed to start is cleaned away and reported there, so the core can mount again.
With zygote on (what the daemon uses, `[fuse] zygote`), mount processes are forked by a
pre-started process that has imported the mount code already (fs/zygote.py): ~0.1 s less per
layer. A zygote that fails is restarted once; if that fails too, mount processes are started
plainly from then on, with a log line that says why. A forked process is not the daemon's
child: it is followed through a pidfd, and recognised after a restart like any other.

on_settled() tells an observer (the metrics) how a mount ends without waiting in check(): it
holds no lock, and cleaning a failed mount away stays check()'s job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter import sidecars
from snapshotter.config import Config
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.cache import NO_RESERVE, CacheError, DiskReserve, SpanCache
from snapshotter.fs.completion import FAILED as CHECK_FAILED
from snapshotter.fs.completion import PASSED as CHECK_PASSED
from snapshotter.fs.completion import CheckError, CheckReport, CompletionCheck
from snapshotter.fs.deaths import Death, DeathWatch, append_death, mount_table, overlays_using
from snapshotter.fs.materialize import (
    Copy,
    MaterializeError,
    plain_directory_on_parent_fs,
    wipe_contents,
)
from snapshotter.fs.mount_process import (
    MOUNT_PROCESS_MODULE,
    OOM_SCORE_ADJ,
    READ_AHEAD_KB,
    MountSpec,
    SpecError,
)
from snapshotter.fs.reader import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_READ_AHEAD_SPANS, DEFAULT_WORKERS
from snapshotter.fs.refusals import LedgerError, RefusalLedger, RefusedIndex, short_detail
from snapshotter.fs.zygote import (
    ZYGOTE_NAME,
    ForkedChild,
    Zygote,
    ZygoteError,
)
from snapshotter.private_files import replace_private

log = logging.getLogger("lazysnap.fs")

DEFAULT_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_BYTES = 2000
MATERIALIZE_POLL_S = 1.0  # the mount process refreshes its state file every 2 s
MATERIALIZE_RETRY_S = 60.0  # after a failed copy; doubles up to MATERIALIZE_RETRY_MAX_S
MATERIALIZE_RETRY_MAX_S = 3600.0
MATERIALIZE_MAX_ATTEMPTS = 3
CHECK_STEP = "its completion check"
BACKGROUND_COMPLETE = "complete"  # the state file's "background" once every span is cached
DEAD_CONNECTION = "FUSE connection is gone (ENOTCONN)"  # mount_problem(): its process died
# A mount process that dies again this soon after being restarted is left for the next check().
RESTART_MIN_INTERVAL_S = 60.0


@dataclass(frozen=True)
class LayerSpec:
    """What is needed to mount one layer: its encoded index (bytes or a file) and its blob."""

    blob: BlobSpec
    index_bytes: bytes | None = None
    index_path: str | None = None
    prefetch_names: tuple[str, ...] = ()  # this layer's part of the image's startup profile
    # For the completion check (fs/completion.py): the layer's diffID from the image config
    # ("" when unknown: the check can then only compare the TOC, and the layer stays lazy), and
    # where the index came from (named in the refusal ledger if the check fails).
    diff_id: str = ""
    artifact_digest: str = ""
    image: str = ""

    def __post_init__(self) -> None:
        if (self.index_bytes is None) == (self.index_path is None):
            raise ValueError("LayerSpec: give exactly one of index_bytes and index_path")


Resolver = Callable[[Mapping[str, str]], LayerSpec]
# A mount process: the daemon's own child (started plainly) or one forked by the zygote.
MountChild = subprocess.Popen[bytes] | ForkedChild
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


def from_config(config: Config, resolve: Resolver | None = None) -> LazyLayers:
    """The daemon's LazyLayers. Without a resolver every mount() falls back (the core then
    pulls the layer whole); the registry-backed resolver is wired by the caller."""
    return LazyLayers(
        config.cache_dir,
        config.cache.max_size_bytes,
        cache_reserve=DiskReserve(config.cache.min_free_bytes, config.cache.min_free_percent),
        resolve=resolve,
        fetch_timeout=config.remote.fetch_timeout_seconds,
        read_ahead_kb=config.fuse.read_ahead_kb,
        read_ahead_spans=config.fetch.read_ahead_spans,
        prefetch=config.fetch.prefetch,
        background=BackgroundSettings(
            enabled=config.fetch.background,
            quiet_seconds=config.fetch.background_quiet_seconds,
            rate_bytes=config.fetch.background_rate_bytes,
        ),
        mount_in_background=True,  # the core waits in check() before a mount is used
        materialize=config.fetch.materialize and config.fetch.background,
        zygote=config.fuse.zygote,
        oom_score_adj=config.fuse.oom_score_adj,
        ledger=RefusalLedger(config.root),
    )


class LazyLayers:
    def __init__(
        self,
        cache_dir: str,
        cache_max_bytes: int,
        *,
        cache_reserve: DiskReserve = NO_RESERVE,
        resolve: Resolver | None = None,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S,
        workers: int = DEFAULT_WORKERS,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
        allow_other: bool = True,
        read_ahead_kb: int = READ_AHEAD_KB,
        read_ahead_spans: int = DEFAULT_READ_AHEAD_SPANS,
        prefetch: bool = True,
        background: BackgroundSettings | None = None,
        python: str = sys.executable,
        mount_in_background: bool = False,
        materialize: bool = False,
        materialize_retry_s: float = MATERIALIZE_RETRY_S,
        zygote: bool = False,
        oom_score_adj: int = OOM_SCORE_ADJ,
        ledger: RefusalLedger | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.cache_reserve = cache_reserve
        self._span_cache: SpanCache | None = None  # for the blobs' user records (unmount)
        self.resolve = resolve
        self.fetch_timeout = fetch_timeout
        self.workers = workers
        self.ready_timeout = ready_timeout
        self.allow_other = allow_other
        self.read_ahead_kb = read_ahead_kb
        self.read_ahead_spans = read_ahead_spans
        self.prefetch = prefetch
        self.background = background or BackgroundSettings()
        self.python = python
        self.mount_in_background = mount_in_background
        self.materialize = materialize
        self.materialize_retry_s = materialize_retry_s
        self.oom_score_adj = oom_score_adj
        # The completion check runs on every layer whose background fetch completes (always
        # on); its refusals are kept node-wide here (default: beside the cache directory).
        self.ledger = ledger or RefusalLedger(os.path.dirname(os.path.abspath(cache_dir)))
        self._checks: dict[str, CompletionCheck] = {}
        self._lazy_only: set[str] = set()  # passed without a diffID: logged once, stays lazy
        self._children: dict[str, MountChild] = {}
        self._startups: dict[str, _Startup] = {}
        self._mount_locks: dict[str, threading.RLock] = {}  # one mount/startup at a time
        # Materialization: the mountpoints this manager serves (mounted, re-attached or checked),
        # the copy in progress, and when a failed layer may be tried again.
        self._known: set[str] = set()
        self._copies: dict[str, Copy] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # mountpoint -> (not before, delay)
        self._attempts: dict[str, int] = {}  # mountpoint -> failed copies so far
        # A copy works the disk and a core: like background fetch, it waits for a quiet node.
        self._node_activity = NodeActivity(cache_dir)
        self._busy = BusyGate(self._node_activity, self.background.quiet_seconds)
        self._watcher: threading.Thread | None = None
        # Held while a finished copy gets its marker and detach, and while unmount() removes a
        # marker: an unmount never leaves a marker behind that a copy wrote after it.
        self._finish_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the dicts, sets and the watcher
        # The zygote forking mount processes; None: start them plainly (off, or given up on).
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()  # held while it is asked, restarted or stopped
        # Mount processes followed through pidfds: a death is reported and the process restarted.
        self._deaths = DeathWatch(self._mount_process_died)
        self._restarted: dict[str, float] = {}  # mountpoint -> when its process was restarted
        self._reported_deaths: dict[str, int] = {}  # mountpoint -> pid whose death was reported
        if zygote:
            try:  # now, so that its imports are done by the first lazy Prepare
                self._zygote = Zygote.start(self.python, MOUNT_PROCESS_MODULE)
            except ZygoteError as exc:
                log.warning("mount-process zygote: %s; starting mount processes plainly", exc)

    def close(self) -> None:
        """Stop the zygote and the death watch (mount processes live on, as after the daemon
        exits)."""
        self._deaths.close()
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    # -- RemoteLayers ------------------------------------------------------------------------------

    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        if self._serve_locally(os.path.abspath(mountpoint)):
            return  # already plain files: no registry, no FUSE
        _raise_if_refused(os.path.abspath(mountpoint))
        if self.resolve is None:
            raise RemoteLayerUnavailable(
                "lazy layers: no resolver configured", FallbackReason.DISABLED
            )
        try:
            spec = self.resolve(labels)
        except RemoteLayerUnavailable:
            raise
        except Exception as exc:  # a resolver failure means "not lazily": fall back, say why
            raise RemoteLayerUnavailable(
                f"resolving layer for {mountpoint}: {exc}", FallbackReason.RESOLVER
            ) from exc
        # Discovery (where the realistic failures are) is done; in the background, the process
        # starts while the caller goes on, and check() waits for it.
        self.mount_layer(mountpoint, spec, wait=not self.mount_in_background)

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Wait for a mount this manager is starting, then raise RemoteLayerUnavailable unless
        the mount is live. A mount that failed to start is unmounted (mount() may try again)."""
        mountpoint = os.path.abspath(mountpoint)
        if self._serve_locally(mountpoint):
            return
        self._await_startup(mountpoint)
        _raise_if_refused(mountpoint)
        problem = self._problem(mountpoint)
        if problem:
            if problem == DEAD_CONNECTION:
                self._death_found_late(mountpoint)
            raise RemoteLayerUnavailable(
                f"lazy layer at {mountpoint}: {problem}", FallbackReason.MOUNT
            )
        self._watch(mountpoint)
        self._follow(mountpoint)

    def on_settled(self, mountpoint: str, callback: SettledCallback) -> None:
        """Call callback once the mount at mountpoint is live or has failed: with None, or with
        the RemoteLayerUnavailable check() would raise. A mount still starting is reported from
        its startup watcher's thread, any other at once. Nothing waits and no lock is held
        meanwhile (check() holds the mountpoint's lock while it waits, so an observer calling it
        would delay everything else done to the layer); a failed mount is left for check()."""
        mountpoint = os.path.abspath(mountpoint)
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
            problem = self._problem(mountpoint)
            why = f"lazy layer at {mountpoint}: {problem}"
            outcome = RemoteLayerUnavailable(why, FallbackReason.MOUNT) if problem else None
        _notify(callback, mountpoint, outcome)

    def unmount(self, mountpoint: str) -> None:
        self._unmount(mountpoint, release_spans=True)

    def _unmount(self, mountpoint: str, *, release_spans: bool) -> None:
        """release_spans: this mount stops using its blob (the last user's spans are deleted);
        False when it is about to be mounted again."""
        mountpoint = os.path.abspath(mountpoint)
        self._deaths.forget(mountpoint)  # its process ends now because it is told to
        with self._lock:
            self._known.discard(mountpoint)
            self._retry.pop(mountpoint, None)
            self._reported_deaths.pop(mountpoint, None)
            self._attempts.pop(mountpoint, None)
            copy = self._copies.get(mountpoint)
            check = self._checks.get(mountpoint)
            self._lazy_only.discard(mountpoint)
        if check is not None:
            check.cancel()
        if copy is not None:
            copy.cancel()  # a copy that already finished sees this before writing its marker
        with self._finish_lock:
            # From here on the directory's contents are a leftover (deleted with the snapshot,
            # or wiped by the next mount), whatever else fails below.
            sidecars.remove_marker(mountpoint)
            sidecars.remove_failure(mountpoint)
            if release_spans:  # the snapshot goes: a refusal stays in the node's ledger
                sidecars.remove_verdict(mountpoint)
        state = sidecars.read_state(mountpoint)
        pid = _as_pid(state.get("pid")) if state else None
        with self._lock:
            child = self._children.pop(mountpoint, None)
            self._startups.pop(mountpoint, None)
        if child is not None:
            pid = child.pid
        if pid is not None and _is_mount_process(pid):
            _signal(pid, child, signal.SIGTERM)
            self._wait_exit(pid, child, STOP_TIMEOUT_S)
        if _mount_status(mountpoint) != "absent":
            _detach(mountpoint)
        if pid is not None and _is_mount_process(pid):
            _signal(pid, child, signal.SIGKILL)
            self._wait_exit(pid, child, STOP_TIMEOUT_S)
        if isinstance(child, ForkedChild):
            child.close()
        if release_spans:
            self._cache_users(sidecars.spec_blob_digest(mountpoint), mountpoint, add=False)
        for suffix in sidecars.MOUNT_SUFFIXES:
            sidecars.remove(sidecars.sidecar_path(mountpoint, suffix))
        # The verdict stays: a refused layer must stay refused on whatever mounts it next; it
        # goes with the snapshot's directory when the snapshot is removed.
        with contextlib.suppress(OSError):  # a copy helper that was killed leaves it, empty
            sidecars.bind_path(mountpoint).rmdir()

    # -- lazysnap's own entry points ---------------------------------------------------------------

    def mount_layer(
        self, mountpoint: str, spec: LayerSpec, *, access_log: str = "", wait: bool = True
    ) -> None:
        """Mount spec at mountpoint (an existing empty directory), or keep the live mount that
        is already there. Raises RemoteLayerUnavailable naming the cause. access_log: record
        each file's first read there (startup-profile recording). wait=False returns once the
        mount process is started; check() then waits for it and reports its failure."""
        mountpoint = os.path.abspath(mountpoint)
        with self._mount_lock(mountpoint):
            self._mount_layer(mountpoint, spec, access_log, wait)

    def _mount_layer(self, mountpoint: str, spec: LayerSpec, access_log: str, wait: bool) -> None:
        if self._serve_locally(mountpoint):
            return
        # Served lazily here before (unmount below removes the spec): the plain directory may
        # hold a copy that never finished. A directory new to lazysnap is never wiped.
        served_before = (
            sidecars.spec_path(mountpoint).exists() or sidecars.bind_path(mountpoint).exists()
        )
        with contextlib.suppress(RemoteLayerUnavailable):
            self._await_startup(mountpoint)  # a layer being mounted: see how that ends first
        if self._problem(mountpoint) is None:
            log.info("re-attached live lazy mount %s", mountpoint)
            # mounted by a version that kept no user records: record it now
            self._cache_users(sidecars.spec_blob_digest(mountpoint), mountpoint, add=True)
            self._watch(mountpoint)
            self._follow(mountpoint)
            return
        if _mount_status(mountpoint) != "absent":  # dead or orphaned mount: clear it first
            self._unmount(mountpoint, release_spans=False)  # its spans serve the new mount
        if not os.path.isdir(mountpoint):
            raise RemoteLayerUnavailable(
                f"mountpoint {mountpoint} is not a directory", FallbackReason.MOUNT
            )
        if served_before:
            self._wipe_leftover_copy(mountpoint)

        index_path = spec.index_path
        if spec.index_bytes is not None:
            index_path = str(sidecars.index_path(mountpoint))
            _write_atomically(Path(index_path), spec.index_bytes)
        assert index_path is not None
        # The bytes discovery fetched are hashed as they are, not read back from the file.
        index_digest = (
            "sha256:" + hashlib.sha256(spec.index_bytes).hexdigest()
            if spec.index_bytes is not None
            else _file_digest(index_path)
        )
        refused = self.ledger.refused(index_digest)
        if refused is not None:  # discovery refuses it first; this holds for any caller
            raise RemoteLayerUnavailable(
                f"index {index_digest} of layer {refused.layer_digest} failed the completion "
                f"check on this node before (refused): {refused.why}",
                reason=FallbackReason.REFUSED_INDEX,
            )
        verdict = sidecars.read_verdict(mountpoint)
        if verdict is not None and verdict.index_digest != index_digest:
            sidecars.remove_verdict(mountpoint)  # a pass speaks for its own index only
        mount_spec = MountSpec(
            mountpoint=mountpoint,
            index_path=os.path.abspath(index_path),
            blob=spec.blob,
            cache_dir=self.cache_dir,
            cache_max_bytes=self.cache_max_bytes,
            cache_min_free_bytes=self.cache_reserve.min_free_bytes,
            cache_min_free_percent=self.cache_reserve.min_free_percent,
            fetch_timeout=self.fetch_timeout,
            workers=self.workers,
            allow_other=self.allow_other,
            read_ahead_kb=self.read_ahead_kb,
            read_ahead_spans=self.read_ahead_spans,
            prefetch_names=spec.prefetch_names,
            prefetch=self.prefetch,
            background=self.background.enabled,
            background_quiet_seconds=self.background.quiet_seconds,
            background_rate_bytes=self.background.rate_bytes,
            access_log=access_log,
            oom_score_adj=self.oom_score_adj,
            diff_id=spec.diff_id,
            index_digest=index_digest,
            artifact_digest=spec.artifact_digest,
            image=spec.image,
        )
        spec_path = sidecars.spec_path(mountpoint)
        _write_atomically(spec_path, json.dumps(mount_spec.to_json(), indent=1).encode())
        self._cache_users(spec.blob.digest, mountpoint, add=True)
        try:
            self._start(mountpoint, spec_path)
        except RemoteLayerUnavailable:
            self.unmount(mountpoint)
            raise
        self._watch(mountpoint)
        if wait:
            self._await_startup(mountpoint)
            problem = self._problem(mountpoint)
            if problem:
                self.unmount(mountpoint)
                raise RemoteLayerUnavailable(
                    f"lazy layer at {mountpoint}: {problem}", FallbackReason.MOUNT
                )

    def is_live(self, mountpoint: str) -> bool:
        mountpoint = os.path.abspath(mountpoint)
        return sidecars.read_marker(mountpoint) is not None or self._problem(mountpoint) is None

    def is_local(self, mountpoint: str) -> bool:
        """True once the layer was copied into plain files (its FUSE mount detached)."""
        return sidecars.read_marker(os.path.abspath(mountpoint)) is not None

    def materialize_now(self, mountpoint: str) -> bool:
        """Copy the layer at mountpoint into plain files now, whatever its background state;
        True if it is local afterwards. The watcher calls this once the layer is complete."""
        mountpoint = os.path.abspath(mountpoint)
        if sidecars.read_marker(mountpoint) is not None:
            return True
        state = sidecars.read_state(mountpoint) or {}
        digest = state.get("layer_digest")
        layer_digest = digest if isinstance(digest, str) else ""
        verdict = sidecars.read_verdict(mountpoint) or self._verify(mountpoint, layer_digest)
        if verdict is None or not self._may_materialize(mountpoint, verdict):
            return False
        return self._materialize(mountpoint, layer_digest)

    # -- materialization ---------------------------------------------------------------------------

    def _serve_locally(self, mountpoint: str) -> bool:
        """True if the layer is local (marker present); a FUSE mount still on it (the daemon
        stopped between writing the marker and detaching) is detached now."""
        if sidecars.read_marker(mountpoint) is None:
            return False
        if _mount_status(mountpoint) != "absent":
            with self._mount_lock(mountpoint):
                if _mount_status(mountpoint) != "absent":
                    log.info("layer at %s is local: detaching its FUSE mount", mountpoint)
                    _detach(mountpoint)
        return True

    def _wipe_leftover_copy(self, mountpoint: str) -> None:
        """Without a marker, whatever the plain directory holds is a copy that did not finish
        (the daemon stopped mid-copy): sidecars.remove it before FUSE mounts over it."""
        if not plain_directory_on_parent_fs(mountpoint):
            return
        try:
            removed = wipe_contents(Path(mountpoint))
        except OSError as exc:
            raise RemoteLayerUnavailable(
                f"removing an unfinished local copy in {mountpoint}: {exc}", FallbackReason.MOUNT
            ) from exc
        if removed:
            log.info("removed an unfinished local copy of the layer at %s", mountpoint)

    def _watch(self, mountpoint: str) -> None:
        """Remember mountpoint for the watcher (started on first use): it runs the completion
        check of a layer whose background fetch is complete, then materializes it (if on)."""
        if not self.materialize and not self.background.enabled:
            return
        with self._lock:
            self._known.add(mountpoint)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._materialize_loop, name="materialize", daemon=True
                )
                self._watcher.start()

    def _materialize_loop(self) -> None:
        while True:
            time.sleep(MATERIALIZE_POLL_S)
            with self._lock:
                candidates = sorted(self._known)
            for mountpoint in candidates:
                try:
                    self._consider(mountpoint)
                except Exception:  # the watcher must outlive any one layer's surprise
                    log.exception("materializing the layer at %s", mountpoint)
            self._reap_detached_children()

    def _consider(self, mountpoint: str) -> None:
        with self._lock:
            if mountpoint not in self._known:
                return
            startup = self._startups.get(mountpoint)
            if startup is not None:
                if not startup.done.is_set() or startup.problem is not None:
                    return  # still starting, or failed: check() cleans that away
                # Ready, but no container used it yet (check() was not called): a layer
                # nobody reads still completes, is checked and materialized.
                del self._startups[mountpoint]
            not_before, _ = self._retry.get(mountpoint, (0.0, 0.0))
        if time.monotonic() < not_before or sidecars.read_marker(mountpoint) is not None:
            return
        if sidecars.failure_recorded(mountpoint):
            return  # given up on; the record says why (deleting it asks for a new try)
        state = sidecars.read_state(mountpoint)
        if not state or state.get("background") != BACKGROUND_COMPLETE:
            return
        if not self._node_quiet():
            return  # a container is starting (fetching, or busy on its mounts): later
        if self._problem(mountpoint) is not None:
            return  # not served: check() mounts it again when it is used
        digest = state.get("layer_digest")
        layer_digest = digest if isinstance(digest, str) else ""
        verdict = sidecars.read_verdict(mountpoint)
        if verdict is None:
            verdict = self._verify(mountpoint, layer_digest)
        if verdict is None or not self.materialize:
            return
        if not self._may_materialize(mountpoint, verdict):
            return
        self._materialize(mountpoint, layer_digest)

    # -- the completion check ----------------------------------------------------------------------

    def _verify(self, mountpoint: str, layer_digest: str) -> sidecars.Verdict | None:
        """Run the completion check of the layer at mountpoint (all its spans cached) and
        record the verdict; None when there is none yet (spans missing, helper failed: tried
        again later). A failure refuses the index (see _refuse)."""
        spec_path = sidecars.spec_path(mountpoint)
        try:
            spec = MountSpec.load(str(spec_path))
        except SpecError as exc:
            log.warning("completion check of the layer at %s: %s", mountpoint, exc)
            return None
        check = CompletionCheck(str(spec_path), python=self.python)
        with self._lock:
            if mountpoint in self._checks:
                return None
            self._checks[mountpoint] = check
        try:
            try:
                report = check.run()
            except CheckError as exc:
                if not check.cancelled:
                    self._failed(mountpoint, layer_digest, str(exc), CHECK_STEP)
                return None
            if check.cancelled:
                return None
            return self._record(mountpoint, spec, report, layer_digest)
        finally:
            with self._lock:
                self._checks.pop(mountpoint, None)

    def _record(
        self, mountpoint: str, spec: MountSpec, report: CheckReport, layer_digest: str
    ) -> sidecars.Verdict | None:
        layer_digest = spec.blob.digest or layer_digest
        if report.result not in (CHECK_PASSED, CHECK_FAILED):  # a span went missing
            self._failed(mountpoint, layer_digest, report.detail, CHECK_STEP)
            return None
        verdict = sidecars.Verdict(
            result=report.result,
            detail=short_detail(report.detail),
            layer_digest=layer_digest,
            index_digest=spec.index_digest,
            diff_id=spec.diff_id,
            checked_at=time.time(),
        )
        if verdict.failed:
            self._refuse(mountpoint, spec, verdict)
            return verdict
        try:
            sidecars.write_verdict(mountpoint, verdict)
            self.ledger.record_pass()
        except (sidecars.SidecarError, LedgerError) as exc:
            self._failed(mountpoint, layer_digest, str(exc), "recording its completion check")
            return None
        log.info(
            "layer %s at %s passed its completion check (%s; %.1fs)",
            layer_digest,
            mountpoint,
            report.detail,
            report.seconds,
        )
        return verdict

    def _refuse(self, mountpoint: str, spec: MountSpec, verdict: sidecars.Verdict) -> None:
        """Fail closed: the verdict file first (the mount process reads it and answers EIO from
        then on, also after a restart), then the node's ledger (later Prepares of this index
        fall back), then the layer's spans go from the cache. Never materialized."""
        with self._finish_lock:
            try:
                sidecars.write_verdict(mountpoint, verdict)
            except sidecars.SidecarError as exc:
                log.error("%s", exc)  # the ledger below still refuses the index
        try:
            self.ledger.record_refusal(
                RefusedIndex(
                    index_digest=spec.index_digest,
                    layer_digest=verdict.layer_digest,
                    why=verdict.detail,
                    artifact_digest=spec.artifact_digest,
                    image=spec.image,
                    refused_at=verdict.checked_at,
                )
            )
        except LedgerError as exc:
            log.error("%s", exc)
        evicted = 0
        try:
            evicted = SpanCache(self.cache_dir, self.cache_max_bytes).evict_layer(
                verdict.layer_digest
            )
        except (CacheError, OSError) as exc:
            log.error("evicting the spans of layer %s: %s", verdict.layer_digest, exc)
        log.error(
            "layer %s (image %s) FAILED its completion check: index blob %s (artifact %s) is "
            "refused on this node; its mount at %s fails every read with EIO, later Prepares "
            "of it fall back to a full pull, %d cached spans were evicted: %s",
            verdict.layer_digest or "?",
            spec.image or "?",
            spec.index_digest or "?",
            spec.artifact_digest or "?",
            mountpoint,
            evicted,
            verdict.detail,
        )

    def _may_materialize(self, mountpoint: str, verdict: sidecars.Verdict) -> bool:
        """Only a layer that passed against its diffID becomes plain files: without one, the
        check could compare the TOC only, not the file data, so the layer stays on FUSE (whose
        every span is verified against the index)."""
        if verdict.failed:
            return False
        if verdict.diff_id:
            return True
        with self._lock:
            first = mountpoint not in self._lazy_only
            self._lazy_only.add(mountpoint)
        if first:
            log.warning(
                "layer %s at %s stays lazy: its diffID is unknown (image config not read), so "
                "its completion check covered the TOC only, not the file data",
                verdict.layer_digest or "?",
                mountpoint,
            )
        return False

    def _node_quiet(self) -> bool:
        quiet = self.background.quiet_seconds
        if self._node_activity.seconds_since_foreground_fetch() < quiet:
            return False
        return self._busy.remaining() <= 0

    def _materialize(self, mountpoint: str, layer_digest: str) -> bool:
        copy = Copy(mountpoint, python=self.python, reserve=self.cache_reserve)
        with self._lock:
            if mountpoint in self._copies:
                return False
            self._copies[mountpoint] = copy
        started = time.monotonic()
        try:
            try:
                copy.run()
            except MaterializeError as exc:
                if not copy.cancelled:
                    self._failed(mountpoint, layer_digest, str(exc), permanent=exc.permanent)
                return False
            with self._finish_lock:
                if copy.cancelled:  # unmounted meanwhile: the copy is a leftover now
                    return False
                try:
                    marker = sidecars.LocalMarker(layer_digest, time.time())
                    sidecars.write_marker(mountpoint, marker)
                except sidecars.SidecarError as exc:
                    self._failed(mountpoint, layer_digest, str(exc))
                    return False
                _detach(mountpoint)
                sidecars.remove_failure(mountpoint)
                with self._lock:
                    self._retry.pop(mountpoint, None)
                    self._attempts.pop(mountpoint, None)
            log.info(
                "layer %s at %s is local now (copied in %.1fs): FUSE mount detached, its "
                "process ends when no container uses it",
                layer_digest or "?",
                mountpoint,
                time.monotonic() - started,
            )
            return True
        finally:
            with self._lock:
                self._copies.pop(mountpoint, None)

    def _failed(
        self,
        mountpoint: str,
        layer_digest: str,
        why: str,
        step: str = "copying it to local disk",
        *,
        permanent: bool = False,
    ) -> None:
        with self._lock:
            attempts = self._attempts.get(mountpoint, 0) + 1
            self._attempts[mountpoint] = attempts
            _, delay = self._retry.get(mountpoint, (0.0, 0.0))
            delay = min(MATERIALIZE_RETRY_MAX_S, delay * 2) if delay else self.materialize_retry_s
            self._retry[mountpoint] = (time.monotonic() + delay, delay)
        if permanent or attempts >= MATERIALIZE_MAX_ATTEMPTS:
            sidecars.write_failure(mountpoint, why, attempts, time.time())
            log.warning(
                "layer %s at %s stays lazy (FUSE keeps serving it): %s failed %d time(s), "
                "giving up: %s (`lazysnap status` shows it; delete %s to try again)",
                layer_digest or "?",
                mountpoint,
                step,
                attempts,
                why,
                sidecars.failure_path(mountpoint),
            )
            return
        log.warning(
            "layer %s at %s stays lazy (FUSE keeps serving it): %s failed: %s; trying again "
            "in %.0fs",
            layer_digest or "?",
            mountpoint,
            step,
            why,
            delay,
        )

    def _reap_detached_children(self) -> None:
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
                if isinstance(child, ForkedChild):
                    child.close()

    # -- internals ---------------------------------------------------------------------------------

    def _start(self, mountpoint: str, spec_path: Path) -> None:
        """Start the mount process; a thread waits for its ready line (see _await_startup)."""
        read_end, write_end = os.pipe()
        log_path = sidecars.log_path(mountpoint)
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            with open(log_fd, "ab") as log_file:
                child = self._fork(spec_path, write_end, log_file.fileno()) or subprocess.Popen(
                    [
                        self.python,
                        "-m",
                        MOUNT_PROCESS_MODULE,
                        "--spec",
                        str(spec_path),
                        "--ready-fd",
                        str(write_end),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(write_end,),
                    start_new_session=True,  # survives serve restarts and its signals
                    cwd="/",
                )
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            raise RemoteLayerUnavailable(
                f"starting mount process for {mountpoint}: {exc}", FallbackReason.MOUNT
            ) from exc
        os.close(write_end)
        startup = _Startup(child, log_path, time.monotonic(), threading.Event())
        with self._lock:
            self._children[mountpoint] = child
            self._startups[mountpoint] = startup
        threading.Thread(
            target=self._watch_startup,
            args=(mountpoint, startup, read_end),
            name=f"mount-startup {mountpoint}",
            daemon=True,
        ).start()

    def _fork(self, spec_path: Path, ready_fd: int, log_fd: int) -> ForkedChild | None:
        """A mount process forked by the zygote, or None: start one plainly. A zygote that fails
        is restarted once; if the new one fails too, the zygote is given up on for good."""
        with self._zygote_lock:
            zygote = self._zygote
            if zygote is None:
                return None
            try:
                return zygote.fork(str(spec_path), ready_fd, log_fd)
            except ZygoteError as exc:
                log.warning(
                    "mount-process zygote (pid %d) failed: %s; starting a new one", zygote.pid, exc
                )
            zygote.close()
            self._zygote = None
            fresh: Zygote | None = None
            try:
                fresh = Zygote.start(self.python, MOUNT_PROCESS_MODULE)
                child = fresh.fork(str(spec_path), ready_fd, log_fd)
            except ZygoteError as exc:
                log.warning(
                    "mount-process zygote failed again (%s): starting mount processes plainly "
                    "from now on (~0.1 s more per lazy layer)",
                    exc,
                )
                if fresh is not None:
                    fresh.close()
                return None
            self._zygote = fresh
            return child

    def _watch_startup(self, mountpoint: str, startup: _Startup, read_end: int) -> None:
        try:
            answer = _read_line(read_end, self.ready_timeout)
        finally:
            os.close(read_end)
        if answer == "ready":
            log.info(
                "lazy layer at %s ready after %.2fs",
                mountpoint,
                time.monotonic() - startup.started,
            )
            self._deaths.follow(mountpoint, startup.child.pid)
        else:
            if answer is None:
                why = f"not ready within {self.ready_timeout:g}s"
            elif answer == "":
                why = f"mount process exited{_exit_note(startup.child)} before it was ready"
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

    # -- mount-process deaths (fs/deaths.py) -------------------------------------------------------

    def _follow(self, mountpoint: str) -> None:
        """Follow the live mount process of mountpoint (from its state file) for its death."""
        state = sidecars.read_state(mountpoint)
        pid = _as_pid(state.get("pid")) if state else None
        if pid is not None and self._deaths.followed(mountpoint) != pid:
            self._deaths.follow(mountpoint, pid)

    def _mount_process_died(self, mountpoint: str, pid: int) -> None:
        """A followed mount process exited without being told to. If its mount is dead (not
        detached on purpose), name the containers it strands, record it, restart the process."""
        with self._mount_lock(mountpoint):
            with self._lock:
                child = self._children.get(mountpoint)
                ours = child is not None and child.pid == pid
                if ours:
                    del self._children[mountpoint]
            note = _death_note(child) if child is not None and ours else ""
            if isinstance(child, ForkedChild) and ours:
                child.close()
            if sidecars.read_marker(mountpoint) is not None or _mount_status(mountpoint) != "dead":
                log.info("mount process %d of %s exited%s", pid, mountpoint, note)
                return
            with self._lock:
                now = time.monotonic()
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
            _detach(mountpoint)  # the stranded mounts keep their own reference to it
            try:
                self._start(mountpoint, spec_path)
            except RemoteLayerUnavailable as exc:
                log.error("restarting the mount process of %s: %s", mountpoint, exc)
                return
            log.warning("started a new mount process for %s (for new containers)", mountpoint)

    def _death_found_late(self, mountpoint: str) -> None:
        """check() found the mount dead without the watch having reported it (the process died
        while the daemon was down): report it now; the caller mounts the layer again."""
        with self._mount_lock(mountpoint):
            state = sidecars.read_state(mountpoint)
            pid = _as_pid(state.get("pid")) if state else None
            if pid is not None and _mount_status(mountpoint) == "dead":
                self._report_death(mountpoint, pid, " (while the daemon was not watching)", False)

    def _report_death(self, mountpoint: str, pid: int, note: str, restart: bool) -> None:
        """Log and record the death of pid under mountpoint, once per pid."""
        with self._lock:
            if self._reported_deaths.get(mountpoint) == pid:
                return
            self._reported_deaths[mountpoint] = pid
        state = sidecars.read_state(mountpoint) or {}
        digest = str(state.get("layer_digest") or "?")
        stranded = overlays_using(mountpoint, mount_table())
        append_death(mountpoint, Death(pid, time.time(), digest, tuple(stranded), restart))
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

    def _mount_lock(self, mountpoint: str) -> threading.RLock:
        with self._lock:
            return self._mount_locks.setdefault(mountpoint, threading.RLock())

    def _await_startup(self, mountpoint: str) -> None:
        """Wait for the startup of mountpoint, if one is in progress; a failed startup is
        cleaned away (process ended, mount detached, sidecars removed) and raised."""
        with self._mount_lock(mountpoint):
            with self._lock:
                startup = self._startups.get(mountpoint)
            if startup is None:
                return
            # The watcher gives up after ready_timeout; the margin covers its own scheduling.
            waiting_since = time.monotonic()
            if not startup.done.is_set():
                startup.done.wait(self.ready_timeout + 5)
                log.info(
                    "waited %.2fs for lazy layer at %s to mount",
                    time.monotonic() - waiting_since,
                    mountpoint,
                )
            with self._lock:
                self._startups.pop(mountpoint, None)
            problem = startup.problem
            if problem is None and not startup.done.is_set():
                problem = f"mounting lazy layer at {mountpoint}: no answer from the mount process"
            if problem is not None:
                self.unmount(mountpoint)
                raise RemoteLayerUnavailable(problem, FallbackReason.MOUNT)

    def _cache_users(self, layer_digest: str, mountpoint: str, *, add: bool) -> None:
        """Record (add) or release this mount as a user of the blob's spans: releasing the last
        user deletes them, so a removed image gives its disk back now, not at eviction."""
        if not layer_digest:
            return
        try:
            with self._lock:
                if self._span_cache is None:
                    self._span_cache = SpanCache(self.cache_dir, self.cache_max_bytes)
                cache = self._span_cache
            if add:
                cache.add_user(layer_digest, mountpoint)
                return
            freed = cache.release_user(layer_digest, mountpoint)
        except (OSError, CacheError) as exc:  # the spans then wait for eviction: log only
            log.warning(
                "span cache %s: recording users of %s: %s", self.cache_dir, layer_digest, exc
            )
            return
        if freed:
            log.info(
                "layer %s has no mount left: %d MiB of its spans deleted from the cache",
                layer_digest,
                freed >> 20,
            )

    def _problem(self, mountpoint: str) -> str | None:
        return mount_problem(mountpoint)

    def _wait_exit(self, pid: int, child: MountChild | None, timeout: float) -> None:
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while _is_mount_process(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


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


def mount_problem(mountpoint: str) -> str | None:
    """Why the lazy mount at mountpoint is not usable, or None if it is live and served."""
    status = _mount_status(mountpoint)
    if status == "dead":
        return DEAD_CONNECTION
    if status == "absent":
        return "not mounted"
    state = sidecars.read_state(mountpoint)
    pid = _as_pid(state.get("pid")) if state else None
    if pid is None:
        return f"no state file {sidecars.state_path(mountpoint)}"
    if not _is_mount_process(pid):
        return f"mount process {pid} is gone"
    return None


def _mount_status(mountpoint: str) -> str:
    """ "live", "dead" (ENOTCONN: the FUSE process is gone) or "absent" (plain directory)."""
    try:
        # statfs always reaches the FUSE process; stat may be answered from the attr cache.
        os.statvfs(mountpoint)
        own = os.stat(mountpoint).st_dev
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "dead"
        return "absent"
    try:
        parent = os.stat(os.path.dirname(mountpoint.rstrip("/")) or "/").st_dev
    except OSError:
        return "absent"
    return "live" if own != parent else "absent"


def _detach(mountpoint: str) -> None:
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        with contextlib.suppress(OSError):
            if subprocess.run(command, capture_output=True, check=False).returncode == 0:
                return
    log.warning("could not unmount %s", mountpoint)


def _is_mount_process(pid: int) -> bool:
    """True if pid is alive (not a zombie) and is a mount process, not a reused pid. Forked
    ones keep the zygote's command line (it names the module too); the zygote is not one."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = status.partition("(")[2].rpartition(")")
    state = rest.split()[0]
    return state != "Z" and MOUNT_PROCESS_MODULE.encode() in cmdline and name != ZYGOTE_NAME


def _signal(pid: int, child: MountChild | None, signum: int) -> None:
    if isinstance(child, ForkedChild):
        child.send_signal(signum)  # through its pidfd: never a process that reused the pid
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _death_note(child: MountChild) -> str:
    """How a mount process ended, as far as the daemon can tell."""
    if isinstance(child, ForkedChild):
        return " (the zygote logs its exit status)"
    status = child.poll()
    if status is None:
        return ""
    return f" (killed by signal {-status})" if status < 0 else f" (exit status {status})"


def _exit_note(child: MountChild) -> str:
    if isinstance(child, ForkedChild):
        return " (its status is in the daemon's log)"
    return f" ({child.poll()})"


def _as_pid(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line on fd; "" at EOF without one; None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
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


def _raise_if_refused(mountpoint: str) -> None:
    verdict = sidecars.read_verdict(mountpoint)
    if verdict is not None and verdict.failed:
        raise RemoteLayerUnavailable(
            f"lazy layer at {mountpoint} failed its completion check (index "
            f"{verdict.index_digest or '?'} refused on this node): {verdict.detail}",
            reason=FallbackReason.REFUSED_INDEX,
        )


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise RemoteLayerUnavailable(f"reading index file {path}: {exc.strerror}") from exc
    return "sha256:" + digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        replace_private(path, data)
    except OSError as exc:
        fix = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f" (the filesystem of {path.parent} is full: free space there)"
        raise RemoteLayerUnavailable(
            f"writing {path}: {exc.strerror}{fix}", FallbackReason.MOUNT
        ) from exc
