"""What happens to a lazy layer once its background fetch is complete: the completion check,
then (with materialize on) its copy into plain files. One watcher thread for all layers.

The watcher first runs the completion check (completion.py, in a helper process) on each layer
whose background fetch is complete, always: the layer's tar stream against its diffID and its
index's TOC. A pass is recorded; a failure refuses the index on this node for good (verdict
file, which makes the mount process fail every read with EIO; the node's ledger, which
discovery and mount_layer consult; the layer's spans evicted) and the layer is never
materialized. Only a layer that passed against a known diffID is materialized.

With materialize on, the watcher copies each such layer into the plain directory under its mount
(copy_helper.py), writes the marker, and lazily detaches the FUSE mount: containers started
afterwards read plain files; running ones keep the detached mount (and its process) alive until
they exit. A local layer is never mounted again (check() and a restart take the marker as
"live"); a failed copy is logged, wiped and tried again later, while FUSE keeps serving, up to
MATERIALIZE_MAX_ATTEMPTS times (once if the helper says no retry can help); then the
materializer gives up and records why beside the mountpoint (status shows "materialize failed:
..."; deleting that record makes it try again). Like background fetch, a copy or a check waits
for a quiet node (no container starting), and pauses while one starts (between the
check's chunks; the copy's cp is stopped with SIGSTOP until the node is quiet again).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from snapshotter import sidecars
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.mount_spec import MountSpec, SpecError
from snapshotter.lazylayers.completion import FAILED as CHECK_FAILED
from snapshotter.lazylayers.completion import PASSED as CHECK_PASSED
from snapshotter.lazylayers.completion import CheckError, CheckReport, CompletionCheck
from snapshotter.lazylayers.copy_helper import (
    Copy,
    MaterializeError,
    plain_directory_on_parent_fs,
    wipe_contents,
)
from snapshotter.lazylayers.mount_checks import ABSENT, detach, mount_problem, mount_status
from snapshotter.lazylayers.refusals import LedgerError, RefusalLedger, RefusedIndex, short_detail
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.lazylayers.supervisor import MountSupervisor

log = logging.getLogger("lazysnap.fs")

MATERIALIZE_POLL_S = 1.0  # the mount process refreshes its state file every 2 s
MATERIALIZE_RETRY_MAX_S = 3600.0  # a failed copy's retry delay doubles up to this
MATERIALIZE_MAX_ATTEMPTS = 3
CHECK_STEP = "its completion check"
BACKGROUND_COMPLETE = "complete"  # the state file's "background" once every span is cached


class Materializer:
    def __init__(
        self,
        settings: LazyLayerSettings,
        ledger: RefusalLedger,
        supervisor: MountSupervisor,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """clock: what the watcher's polls, retry delays, quiet periods and records go by."""
        self.settings = settings
        self._clock = clock
        self.ledger = ledger
        self._supervisor = supervisor
        self._checks: dict[str, CompletionCheck] = {}
        self._lazy_only: set[str] = set()  # passed without a diffID: logged once, stays lazy
        # The mountpoints watched (mounted, re-attached or checked), the copy in progress, and
        # when a failed layer may be tried again.
        self._known: set[str] = set()
        self._copies: dict[str, Copy] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # mountpoint -> (not before, delay)
        self._attempts: dict[str, int] = {}  # mountpoint -> failed copies so far
        # A copy works the disk and a core: like background fetch, it waits for a quiet node.
        self._busy = BusyGate(
            NodeActivity(settings.cache_dir, clock),
            settings.background.quiet_seconds,
            fetches=True,
        )
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()  # ends the watcher
        # Held while a finished copy gets its marker and detach, and while forget() removes a
        # marker: an unmount never leaves a marker behind that a copy wrote after it.
        self._finish_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the dicts, sets and the watcher

    def close(self) -> None:
        """End the watcher after its current step (a check or copy runs to its end)."""
        self._closed.set()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._known)

    def watch(self, mountpoint: str) -> None:
        """Remember mountpoint for the watcher (started on first use): it runs the completion
        check of a layer whose background fetch is complete, then materializes it (if on)."""
        if not self.settings.materialize and not self.settings.background.enabled:
            return
        with self._lock:
            self._known.add(mountpoint)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._materialize_loop, name="materialize", daemon=True
                )
                self._watcher.start()

    def forget(self, mountpoint: str, *, keep_verdict: bool) -> None:
        """mountpoint is being unmounted: cancel its check and copy, remove its marker and
        failure record (and its verdict, unless keep_verdict: it is mounted again at once)."""
        with self._lock:
            self._known.discard(mountpoint)
            self._retry.pop(mountpoint, None)
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
            if not keep_verdict:  # the snapshot goes: a refusal stays in the node's ledger
                sidecars.remove_verdict(mountpoint)

    def serve_locally(self, mountpoint: str) -> bool:
        """True if the layer is local (marker present); a FUSE mount still on it (the daemon
        stopped between writing the marker and detaching) is detached now."""
        if sidecars.read_marker(mountpoint) is None:
            return False
        if mount_status(mountpoint) != ABSENT:
            with self._supervisor.mount_lock(mountpoint):
                if mount_status(mountpoint) != ABSENT:
                    log.info("layer at %s is local: detaching its FUSE mount", mountpoint)
                    detach(mountpoint)
        return True

    def wipe_leftover_copy(self, mountpoint: str) -> None:
        """Without a marker, whatever the plain directory holds is a copy that did not finish
        (the daemon stopped mid-copy): remove it before FUSE mounts over it."""
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

    # -- the watcher -------------------------------------------------------------------------------

    def _materialize_loop(self) -> None:
        while not self._clock.wait(self._closed, MATERIALIZE_POLL_S):
            for mountpoint in self.watched():
                try:
                    self._consider(mountpoint)
                except Exception:  # the watcher must outlive any one layer's surprise
                    log.exception("materializing the layer at %s", mountpoint)
            self._supervisor.reap_detached_children()

    def _consider(self, mountpoint: str) -> None:
        with self._lock:
            if mountpoint not in self._known:
                return
            not_before, _ = self._retry.get(mountpoint, (0.0, 0.0))
        # Still starting, or failed (check() cleans that away); a layer that is ready but
        # nobody used yet (check() was not called) still completes, is checked and copied.
        if not self._supervisor.startup_settled(mountpoint):
            return
        if self._clock.monotonic() < not_before or sidecars.read_marker(mountpoint) is not None:
            return
        if sidecars.failure_recorded(mountpoint):
            return  # given up on; the record says why (deleting it asks for a new try)
        state = sidecars.read_state(mountpoint)
        if not state or state.get("background") != BACKGROUND_COMPLETE:
            return
        if not self._node_quiet():
            return  # a container is starting (fetching, or busy on its mounts): later
        if mount_problem(mountpoint) is not None:
            return  # not served: check() mounts it again when it is used
        digest = state.get("layer_digest")
        layer_digest = digest if isinstance(digest, str) else ""
        verdict = sidecars.read_verdict(mountpoint)
        if verdict is None:
            verdict = self._verify(mountpoint, layer_digest)
        if verdict is None or not self.settings.materialize:
            return
        if not self._may_materialize(mountpoint, verdict):
            return
        self._materialize(mountpoint, layer_digest)

    def _node_quiet(self) -> bool:
        return self._busy.remaining() <= 0

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
        check = CompletionCheck(str(spec_path), python=self.settings.python)
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
            checked_at=self._clock.time(),
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
            cache = SpanCache(self.settings.cache_dir, self.settings.cache_max_bytes)
            evicted = cache.evict_layer(verdict.layer_digest)
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

    # -- the copy ----------------------------------------------------------------------------------

    def _materialize(self, mountpoint: str, layer_digest: str) -> bool:
        copy = Copy(mountpoint, python=self.settings.python, reserve=self.settings.cache_reserve)
        with self._lock:
            if mountpoint in self._copies:
                return False
            self._copies[mountpoint] = copy
        started = self._clock.monotonic()
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
                    marker = sidecars.LocalMarker(layer_digest, self._clock.time())
                    sidecars.write_marker(mountpoint, marker)
                except sidecars.SidecarError as exc:
                    self._failed(mountpoint, layer_digest, str(exc))
                    return False
                detach(mountpoint)
                sidecars.remove_failure(mountpoint)
                with self._lock:
                    self._retry.pop(mountpoint, None)
                    self._attempts.pop(mountpoint, None)
            log.info(
                "layer %s at %s is local now (copied in %.1fs): FUSE mount detached, its "
                "process ends when no container uses it",
                layer_digest or "?",
                mountpoint,
                self._clock.monotonic() - started,
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
            first_delay = self.settings.materialize_retry_s
            delay = min(MATERIALIZE_RETRY_MAX_S, delay * 2) if delay else first_delay
            self._retry[mountpoint] = (self._clock.monotonic() + delay, delay)
        if permanent or attempts >= MATERIALIZE_MAX_ATTEMPTS:
            sidecars.write_failure(mountpoint, why, attempts, self._clock.time())
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
