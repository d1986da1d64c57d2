"""LazyLayers: the RemoteLayers implementation that the snapshot core gets injected (core/layers.py:
mount, check, unmount). It resolves a layer's labels to a LayerSpec (discovery), writes the files
its mount process starts from (layer_spec.py), and leaves the processes to the supervisor
(supervisor.py) and complete layers to the materializer (materializer.py). The files beside each
mountpoint are listed in snapshotter/sidecars.py. A mountpoint that is still live with a live
process is re-attached, not mounted again.

With mount_in_background (what the daemon uses), mount() returns once the process is started,
without waiting for it to be ready: the core then answers Prepare at once and the layers of an
image mount in parallel (otherwise mount() waits, as mount_layer does). check() is where a
starting mount is waited for (the core calls it before handing out a mount that uses the layer);
a mount that failed to start is cleaned away and reported there, so the core can mount again.
on_settled() tells an observer (the metrics) how a mount ends without waiting in check().
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping

from snapshotter import sidecars
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.lazylayers.layer_spec import LayerSpec, Resolver, write_mount_spec
from snapshotter.lazylayers.materializer import Materializer
from snapshotter.lazylayers.mount_checks import ABSENT, DEAD_CONNECTION, mount_problem, mount_status
from snapshotter.lazylayers.refusals import RefusalLedger
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.lazylayers.supervisor import MountSupervisor, SettledCallback
from snapshotter.remote.session_credentials import SessionCredentials

log = logging.getLogger("lazysnap.fs")


class LazyLayers:
    def __init__(
        self,
        settings: LazyLayerSettings,
        *,
        resolve: Resolver | None = None,
        ledger: RefusalLedger | None = None,
        session_credentials: SessionCredentials | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Without a resolver every mount() falls back (the core then pulls the layer whole).
        ledger: the node's completion-check refusals (default: beside the cache directory).
        session_credentials: pull credentials the CRI proxy keeps in memory, handed to the
        mount processes of their repositories' layers. clock: the daemon side's time (startup
        waits, restart intervals, the materializer's polls, retries and quiet periods); the
        mount processes keep their own."""
        self.settings = settings
        self.resolve = resolve
        cache_parent = os.path.dirname(os.path.abspath(settings.cache_dir))
        self.ledger = ledger or RefusalLedger(cache_parent)
        self.supervisor = MountSupervisor(
            settings.python,
            ready_timeout=settings.ready_timeout,
            zygote=settings.zygote,
            session_credentials=session_credentials,
            clock=clock,
        )
        self.materializer = Materializer(settings, self.ledger, self.supervisor, clock)
        self._span_cache: SpanCache | None = None  # for the blobs' user records (unmount)
        self._span_cache_lock = threading.Lock()

    def close(self) -> None:
        """Stop the zygote, the death watch and the materializer's watcher (mount processes
        live on, as after the daemon exits)."""
        self.materializer.close()
        self.supervisor.close()

    # -- RemoteLayers ------------------------------------------------------------------------------

    def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        if self.materializer.serve_locally(os.path.abspath(mountpoint)):
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
        self.mount_layer(mountpoint, spec, wait=not self.settings.mount_in_background)

    def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Wait for a mount this is starting, then raise RemoteLayerUnavailable unless
        the mount is live. A mount that failed to start is unmounted (mount() may try again)."""
        mountpoint = os.path.abspath(mountpoint)
        if self.materializer.serve_locally(mountpoint):
            return
        self._await_startup(mountpoint)
        _raise_if_refused(mountpoint)
        problem = mount_problem(mountpoint)
        if problem:
            if problem == DEAD_CONNECTION:
                self.supervisor.report_late_death(mountpoint)
            raise RemoteLayerUnavailable(
                f"lazy layer at {mountpoint}: {problem}", FallbackReason.MOUNT
            )
        self.materializer.watch(mountpoint)
        self.supervisor.follow(mountpoint)

    def on_settled(self, mountpoint: str, callback: SettledCallback) -> None:
        """Call callback once the mount at mountpoint is live (None) or has failed (what
        check() would raise); see MountSupervisor.on_settled."""
        self.supervisor.on_settled(os.path.abspath(mountpoint), callback)

    def unmount(self, mountpoint: str) -> None:
        self._unmount(mountpoint, release_spans=True)

    # -- lazysnap's own entry point ----------------------------------------------------------------

    def mount_layer(
        self, mountpoint: str, spec: LayerSpec, *, access_log: str = "", wait: bool = True
    ) -> None:
        """Mount spec at mountpoint (an existing empty directory), or keep the live mount that
        is already there. Raises RemoteLayerUnavailable naming the cause. access_log: record
        each file's first read there (startup-profile recording). wait=False returns once the
        mount process is started; check() then waits for it and reports its failure."""
        mountpoint = os.path.abspath(mountpoint)
        with self.supervisor.mount_lock(mountpoint):
            self._mount_layer(mountpoint, spec, access_log, wait)

    def _mount_layer(self, mountpoint: str, spec: LayerSpec, access_log: str, wait: bool) -> None:
        if self.materializer.serve_locally(mountpoint):
            return
        # Served lazily here before (unmount below removes the spec): the plain directory may
        # hold a copy that never finished. A directory new to lazysnap is never wiped.
        served_before = (
            sidecars.spec_path(mountpoint).exists() or sidecars.bind_path(mountpoint).exists()
        )
        with contextlib.suppress(RemoteLayerUnavailable):
            self._await_startup(mountpoint)  # a layer being mounted: see how that ends first
        if mount_problem(mountpoint) is None:
            log.info("re-attached live lazy mount %s", mountpoint)
            # mounted by a version that kept no user records: record it now
            self._cache_users(sidecars.spec_blob_digest(mountpoint), mountpoint, add=True)
            self.materializer.watch(mountpoint)
            self.supervisor.follow(mountpoint)
            return
        if mount_status(mountpoint) != ABSENT:  # dead or orphaned mount: clear it first
            self._unmount(mountpoint, release_spans=False)  # its spans serve the new mount
        if not os.path.isdir(mountpoint):
            raise RemoteLayerUnavailable(
                f"mountpoint {mountpoint} is not a directory", FallbackReason.MOUNT
            )
        if served_before:
            self.materializer.wipe_leftover_copy(mountpoint)
        spec_path = write_mount_spec(self.settings, self.ledger, mountpoint, spec, access_log)
        self._cache_users(spec.blob.digest, mountpoint, add=True)
        try:
            self.supervisor.start(mountpoint, spec_path)
        except RemoteLayerUnavailable:
            self.unmount(mountpoint)
            raise
        self.materializer.watch(mountpoint)
        if wait:
            self._await_startup(mountpoint)
            problem = mount_problem(mountpoint)
            if problem:
                self.unmount(mountpoint)
                raise RemoteLayerUnavailable(
                    f"lazy layer at {mountpoint}: {problem}", FallbackReason.MOUNT
                )

    # -- internals ---------------------------------------------------------------------------------

    def _await_startup(self, mountpoint: str) -> None:
        """Wait for the startup of mountpoint, if one is in progress; a failed startup is
        cleaned away (process ended, mount detached, sidecars removed) and raised."""
        with self.supervisor.mount_lock(mountpoint):
            problem = self.supervisor.await_startup(mountpoint)
            if problem is not None:
                self.unmount(mountpoint)
                raise RemoteLayerUnavailable(problem, FallbackReason.MOUNT)

    def _unmount(self, mountpoint: str, *, release_spans: bool) -> None:
        """release_spans: this mount stops using its blob (the last user's spans are deleted);
        False when it is about to be mounted again."""
        mountpoint = os.path.abspath(mountpoint)
        self.supervisor.forget(mountpoint)  # its process ends now because it is told to
        self.materializer.forget(mountpoint, keep_verdict=not release_spans)
        self.supervisor.stop(mountpoint)
        if release_spans:
            self._cache_users(sidecars.spec_blob_digest(mountpoint), mountpoint, add=False)
        for suffix in sidecars.MOUNT_SUFFIXES:
            sidecars.remove(sidecars.sidecar_path(mountpoint, suffix))
        # The verdict stays: a refused layer must stay refused on whatever mounts it next; it
        # goes with the snapshot's directory when the snapshot is removed.
        with contextlib.suppress(OSError):  # a copy helper that was killed leaves it, empty
            sidecars.bind_path(mountpoint).rmdir()

    def _cache_users(self, layer_digest: str, mountpoint: str, *, add: bool) -> None:
        """Record (add) or release this mount as a user of the blob's spans: releasing the last
        user deletes them, so a removed image gives its disk back now, not at eviction."""
        if not layer_digest:
            return
        cache_dir = self.settings.cache_dir
        try:
            with self._span_cache_lock:
                if self._span_cache is None:
                    self._span_cache = SpanCache(cache_dir, self.settings.cache_max_bytes)
                cache = self._span_cache
            if add:
                cache.add_user(layer_digest, mountpoint)
                return
            freed = cache.release_user(layer_digest, mountpoint)
        except (OSError, CacheError) as exc:  # the spans then wait for eviction: log only
            log.warning("span cache %s: recording users of %s: %s", cache_dir, layer_digest, exc)
            return
        if freed:
            log.info(
                "layer %s has no mount left: %d MiB of its spans deleted from the cache",
                layer_digest,
                freed >> 20,
            )


def _raise_if_refused(mountpoint: str) -> None:
    verdict = sidecars.read_verdict(mountpoint)
    if verdict is not None and verdict.failed:
        raise RemoteLayerUnavailable(
            f"lazy layer at {mountpoint} failed its completion check (index "
            f"{verdict.index_digest or '?'} refused on this node): {verdict.detail}",
            reason=FallbackReason.REFUSED_INDEX,
        )
