"""One process per mounted lazy layer: `python -m snapshotter.fs.mount_process --spec FILE`.

It is started detached (its own session) so it outlives `lazysnap serve`, either as a fresh
interpreter or forked by the daemon's zygote (`--zygote-fd`, snapshotter/fs/zygote.py), which
has imported this code already; both run main() with the same arguments. It reports "ready"
on --ready-fd only once the mount is live (the mountpoint's device changed and its readahead
was raised), or "error: <why>" if it cannot mount. While mounted it keeps a state file next to
the mountpoint (pid, mountpoint, layer digest, counters) for `lazysnap status` and for the
daemon re-attaching after a restart. SIGTERM unmounts cleanly (libfuse's handler ends the loop
and unmounts). A failed completion check (the daemon's verdict file beside the mountpoint, read
at start and every state interval) makes every request but a stat of the root fail with EIO.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from snapshotter.fs import credential_channel
from snapshotter.fs.access_log import AccessLog
from snapshotter.fs.background import (
    BackgroundFetcher,
    BackgroundState,
)
from snapshotter.fs.blob_source import BlobSpecError, open_blob_source
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.cache_errors import CacheError
from snapshotter.fs.disk_reserve import DiskReserve
from snapshotter.fs.mount_spec import PACK_READ_AHEAD_KB, MountSpec, SpecError, load_index
from snapshotter.fs.pack_store import PackState, PackStore
from snapshotter.fs.reader import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_WORKERS,
    BlobSource,
    LayerReader,
)
from snapshotter.fs.tree import LayerTree, LayerTreeError
from snapshotter.index.model import LayerIndex
from snapshotter.index.pack import PackError
from snapshotter.index.spans import spans_for_files
from snapshotter.sidecars import read_verdict, remove, state_path, write_state

log = logging.getLogger("lazysnap.fs")

MOUNT_WAIT_S = 30.0
# Background fetch states after which no span comes in any more without a read asking for it.
_DONE = (BackgroundState.COMPLETE, BackgroundState.DEGRADED)
MOUNT_POLL_S = 0.002  # the mount goes live a few ms after libfuse starts: "ready" follows soon


def open_windows_source(spec: MountSpec, index: LayerIndex) -> BlobSource | None:
    """The windows blob of a version-2 index: in the layer blob's repository, read with the
    same hosts and credentials. Only a registry source names a repository to find it in."""
    if index.windows is None:
        return None
    if spec.blob.kind != "registry":
        raise SpecError(
            f"index file {spec.index_path}: layer {index.layer_digest} keeps its windows in "
            f"windows blob {index.windows.digest}, which a {spec.blob.kind!r} blob source "
            "cannot read (only a registry one)"
        )
    windows = dataclasses.replace(spec.blob, digest=index.windows.digest, size=index.windows.size)
    return open_blob_source(windows, timeout=spec.fetch_timeout)


class _Reporter:
    """Writes the single ready/error line the parent waits for, once."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            with contextlib.suppress(OSError):
                os.write(self._fd, (line.replace("\n", " ") + "\n").encode())
                os.close(self._fd)
            self._fd = None


class _StateKeeper(threading.Thread):
    """Waits for the mount to go live, then reports ready and refreshes the state file."""

    def __init__(
        self,
        spec: MountSpec,
        reader: LayerReader,
        reporter: _Reporter,
        device_before: int,
    ) -> None:
        super().__init__(name="state-keeper", daemon=True)
        self.spec = spec
        self.reader = reader
        self.reporter = reporter
        self.device_before = device_before
        self.background = BackgroundFetcher(reader, spec.background_settings())
        self.refuse: Callable[[str], None] | None = None  # the FUSE operations' refuse()
        self.pack: PackStore | None = None
        self.refused = False
        self.stopped = threading.Event()
        self.became_ready = threading.Event()
        self.started_at = time.time()
        self._state_write_failed = False
        self._start_over = False  # see starting()

    def run(self) -> None:
        deadline = time.monotonic() + MOUNT_WAIT_S
        device = self.device_before
        while not self.stopped.is_set():
            with contextlib.suppress(OSError):
                device = os.stat(self.spec.mountpoint).st_dev
            if device != self.device_before:
                break
            if time.monotonic() > deadline:
                self.reporter.send(
                    f"error: {self.spec.mountpoint} not mounted after {MOUNT_WAIT_S}s"
                )
                return
            self.stopped.wait(MOUNT_POLL_S)
        else:
            return
        read_ahead_kb = self.read_ahead_kb()
        _raise_read_ahead(device, read_ahead_kb)
        self.write_state()
        self.became_ready.set()
        self.reporter.send("ready")
        log.info("mounted %s at %s", self.reader.layer_digest, self.spec.mountpoint)
        if self.spec.background and not self.refused:
            self.background.start()
        while not self.stopped.wait(self.spec.state_interval):
            self.check_verdict()
            self.write_state()
            if self.pack is not None:
                if self.background.state is BackgroundState.COMPLETE:
                    self.pack.release()  # every span is local: the pack's room goes back
                else:
                    self.pack.keep(time.monotonic())
            if self.read_ahead_kb() != read_ahead_kb:  # the pack or the start is done with
                read_ahead_kb = self.read_ahead_kb()
                _raise_read_ahead(device, read_ahead_kb)
        self.background.stop()

    def read_ahead_kb(self) -> int:
        """A small read-ahead while the start-up pack serves (PACK_READ_AHEAD_KB) or the
        layer's start goes on (the spec's start_read_ahead_kb), the spec's read_ahead_kb
        otherwise. The kernel takes a file's read-ahead from the mount when the file is opened,
        so files opened during the start keep the small one."""
        if self.pack is not None and self.pack.state in (PackState.FETCHING, PackState.READY):
            return min(self.spec.read_ahead_kb, PACK_READ_AHEAD_KB)
        if self.starting():
            return min(self.spec.read_ahead_kb, self.spec.start_read_ahead_kb)
        return self.spec.read_ahead_kb

    def starting(self) -> bool:
        """The layer's start goes on: until its background fetch leaves WAITING (the layer was
        quiet for background_quiet_seconds), or with background fetch off, until the reads
        first went quiet that long. Once over, it stays over."""
        if self._start_over:
            return False
        if self.spec.background:
            over = self.background.state is not BackgroundState.WAITING
        else:
            over = self.reader.idle_seconds() >= self.spec.background_quiet_seconds
        self._start_over = over
        return not over

    def check_verdict(self) -> None:
        """A failed completion check (the daemon's verdict file beside the mountpoint) makes
        the mount fail closed, for good: background fetch stops, every read gets EIO."""
        if self.refused or self.refuse is None:
            return
        verdict = read_verdict(self.spec.mountpoint)
        if verdict is None or not verdict.failed:
            return
        self.refused = True
        self.refuse(f"layer {self.reader.layer_digest} failed its completion check: "
                    f"{verdict.detail}")  # fmt: skip
        self.background.stop()
        if self.background.is_alive():
            self.background.join(self.spec.fetch_timeout + 5)
        # The daemon evicted the layer's spans already; reads since then (before this process
        # saw the verdict) may have fetched some again: nothing of it may stay.
        with contextlib.suppress(OSError, ValueError):
            self.reader.cache.evict_layer(self.reader.layer_digest)

    def write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "mountpoint": self.spec.mountpoint,
            "layer_digest": self.reader.layer_digest,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "cache_dir": self.spec.cache_dir,
            "counters": self.reader.counters().as_dict(),
            "background": str(self.background.state) if self.spec.background else "off",
            "refused": self.refused,
        }
        if self.pack is not None:
            state["pack"] = str(self.pack.state)
        if self.reader.cache.disk_limited():
            state["cache_disk_limited"] = True  # spans served without being cached
        path = state_path(self.spec.mountpoint)
        try:
            write_state(self.spec.mountpoint, state)
        except OSError as exc:
            # A full disk must not fill the log either: once, until a write succeeds again.
            if not self._state_write_failed:
                log.warning(
                    "cannot write state file %s: %s (serving goes on; `lazysnap status` shows "
                    "old counters until it can)",
                    path,
                    exc,
                )
            self._state_write_failed = True
            return
        if self._state_write_failed:
            log.info("state file %s written again", path)
        self._state_write_failed = False


def open_pack(
    spec: MountSpec,
    index: LayerIndex,
    reader: LayerReader,
    cache: SpanCache,
    on_failure: Callable[[], None],
) -> PackStore | None:
    """The layer's section of the start-up pack, not started yet; None (logged) when it cannot
    be used: the mount then prefetches the profile's files from spans."""
    assert spec.pack is not None
    where = f"start-up pack {spec.pack.pack_digest} of layer {index.layer_digest}"
    if spec.blob.kind != "registry":
        log.error("%s not used: a %r blob source cannot read it", where, spec.blob.kind)
        return None
    blob = dataclasses.replace(spec.blob, digest=spec.pack.pack_digest, size=spec.pack.pack_size)
    try:
        source = open_blob_source(blob, timeout=spec.fetch_timeout)
        return PackStore(
            index.layer_digest,
            spec.pack,
            index.uncompressed_size,
            source,
            cache,
            reader.shared_counters,
            wait_timeout=spec.fetch_timeout,
            on_failure=on_failure,
        )
    except (BlobSpecError, PackError) as exc:
        log.error("%s not used: %s", where, exc)
        return None


def _raise_read_ahead(device: int, read_ahead_kb: int) -> None:
    # FUSE mounts get a bdi named after their anonymous device, e.g. 0:52.
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        bdi.write_text(f"{read_ahead_kb}\n")
    except OSError as exc:  # not fatal: only 128 KiB reads
        log.warning("cannot raise readahead in %s: %s", bdi, exc)


def _set_oom_score_adj(value: int) -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{value}\n")
    except OSError as exc:  # lowering it needs CAP_SYS_RESOURCE: expected without it
        log.info(
            "cannot set oom_score_adj to %d (%s): lowering it needs CAP_SYS_RESOURCE",
            value,
            exc.strerror,
        )


def run(spec: MountSpec, ready_fd: int | None) -> int:
    reporter = _Reporter(ready_fd)
    _set_oom_score_adj(spec.oom_score_adj)
    try:
        index = load_index(spec.index_path)
        if spec.blob.digest and spec.blob.digest != index.layer_digest:
            raise SpecError(
                f"index file {spec.index_path} describes layer {index.layer_digest}, "
                f"not blob {spec.blob.digest}"
            )
        cache = SpanCache(
            spec.cache_dir,
            spec.cache_max_bytes,
            reserve=DiskReserve(spec.cache_min_free_bytes, spec.cache_min_free_percent),
        )
        blob = open_blob_source(spec.blob, timeout=spec.fetch_timeout)
        windows = open_windows_source(spec, index)
        device_before = os.stat(spec.mountpoint).st_dev
    except (SpecError, CacheError, BlobSpecError) as exc:
        reporter.send(f"error: {exc}")
        log.error("cannot mount %s: %s", spec.mountpoint, exc)
        return 2
    except OSError as exc:
        reporter.send(f"error: mountpoint {spec.mountpoint}: {exc.strerror}")
        log.error("cannot mount %s: %s", spec.mountpoint, exc.strerror)
        return 2

    reader = LayerReader(
        index,
        blob,
        cache,
        workers=spec.workers,
        fetch_timeout=spec.fetch_timeout,
        read_ahead_spans=spec.read_ahead_spans,
        read_around_bytes=spec.read_around_bytes,
        read_around_scope=spec.read_around_scope,
        windows=windows,
    )
    # The startup prefetch (and the start-up pack) go out before the tree is built and the
    # mount goes live: a cold container start waits on these bytes, and building the tree of a
    # big layer takes ~0.1 s. With a pack, the profile's files come from it (only the bytes the
    # workload read; the rest of a file on demand): their spans are fetched only if it fails.
    pack = None
    if spec.prefetch and spec.pack is not None:
        profile_files = spans_for_files(index, spec.prefetch_names)
        pack = open_pack(spec, index, reader, cache, lambda: reader.prefetch(profile_files))
    if spec.prefetch:
        names = index.prefetch if pack is not None else (*index.prefetch, *spec.prefetch_names)
        if pack is not None:
            reader.pack = pack
            pack.start()
        reader.prefetch(spans_for_files(index, names))
    try:
        tree = LayerTree.from_index(index)
        access_log = AccessLog(spec.access_log) if spec.access_log else None
    except LayerTreeError as exc:
        reader.close()
        reporter.send(f"error: {exc}")
        log.error("cannot mount %s: %s", spec.mountpoint, exc)
        return 2
    except OSError as exc:
        reader.close()
        reporter.send(f"error: access log {spec.access_log}: {exc.strerror}")
        return 2
    # The index and the tree live as long as the process: keep their ~100k objects out of
    # every later collection (each would walk them all, pausing the FUSE threads).
    gc.freeze()

    from snapshotter.fs import fuse_ops  # loads libfuse3; kept out of the spec checks above

    keeper = _StateKeeper(spec, reader, reporter, device_before)
    keeper.pack = pack
    verdict = read_verdict(spec.mountpoint)
    refused_before = verdict.detail if verdict is not None and verdict.failed else None
    if refused_before is not None:  # refused before this process started: fail closed at once
        keeper.refused = True
        log.error("layer %s failed its completion check before: every read gets EIO: %s",
                  index.layer_digest, refused_before)  # fmt: skip
    keeper.start()
    try:
        operations = fuse_ops.LayerOperations(tree, reader, access_log)
        if refused_before is not None:
            operations.refused = refused_before
        keeper.refuse = operations.refuse
        fuse_ops.serve(
            operations,
            spec.mountpoint,
            fsname=f"lazysnap:{index.layer_digest}",
            allow_other=spec.allow_other,
        )
    except RuntimeError as exc:
        # libfuse reports a loop ended by SIGTERM as a failure; once live, it is our stop.
        if keeper.became_ready.is_set():
            log.info("stopping on signal (libfuse status %s)", exc)
        else:
            reporter.send(f"error: mounting {spec.mountpoint}: libfuse status {exc}")
            log.error("mounting %s failed: libfuse status %s", spec.mountpoint, exc)
            return 1
    finally:
        keeper.stopped.set()
        keeper.join(timeout=5)
        reader.close()
        if pack is not None:
            pack.release()
        if access_log is not None:
            access_log.close()
        remove(state_path(spec.mountpoint))
    reporter.send(f"error: {spec.mountpoint} was unmounted before it became ready")
    log.info("unmounted %s from %s", index.layer_digest, spec.mountpoint)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m snapshotter.fs.mount_process",
        description="Serve one lazy layer over FUSE until unmounted or SIGTERM.",
    )
    parser.add_argument("--spec", help="JSON mount spec (all other options come from it)")
    parser.add_argument("--mountpoint")
    parser.add_argument("--index", help="encoded layer index file")
    parser.add_argument("--blob-file", help="local copy of the layer blob")
    parser.add_argument("--cache-dir")
    parser.add_argument("--cache-max-bytes", type=int, default=10 << 30)
    parser.add_argument("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT_S)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--ready-fd", type=int, help="write 'ready' or 'error: ...' here once")
    parser.add_argument(
        credential_channel.ARGUMENT,
        type=int,
        dest="credentials_fd",
        help="read the image's pull credentials from this fd (fs/credential_channel.py)",
    )
    parser.add_argument(
        "--zygote-fd",
        type=int,
        help="be the daemon's zygote (snapshotter.fs.zygote): fork mount processes on request",
    )
    return parser.parse_args(argv)


def _spec_from_args(args: argparse.Namespace) -> MountSpec:
    if args.spec:
        return MountSpec.load(args.spec)
    missing = [
        option
        for option, value in (
            ("--mountpoint", args.mountpoint),
            ("--index", args.index),
            ("--blob-file", args.blob_file),
            ("--cache-dir", args.cache_dir),
        )
        if not value
    ]
    if missing:
        raise SpecError(f"missing {', '.join(missing)} (or give --spec FILE)")
    blob = {"kind": "file", "location": args.blob_file}
    return MountSpec.from_json(
        {
            "mountpoint": args.mountpoint,
            "index_path": args.index,
            "blob": blob,
            "cache_dir": args.cache_dir,
            "cache_max_bytes": args.cache_max_bytes,
            "fetch_timeout": args.fetch_timeout,
            "workers": args.workers,
        },
        source="command line",
    )


def _import_mount_code() -> None:
    """The zygote's preload: what a mount process imports before it serves (this module and
    what it and open_blob_source import lazily), so a forked child starts with them done."""
    import snapshotter.fs.blob_source
    import snapshotter.fs.fuse_ops
    import snapshotter.index.codec
    import snapshotter.index.spans
    import snapshotter.remote.auth
    import snapshotter.remote.blob
    import snapshotter.remote.client
    import snapshotter.remote.credentials
    import snapshotter.remote.hosts  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.zygote_fd is not None:
        from snapshotter.fs import zygote

        request = zygote.serve(args.zygote_fd, preload=_import_mount_code)
        if request is None:
            return 0
        # A forked child: the rest is what a mount process started on its own does.
        zygote.become_child(request)
        child_argv = ["--spec", request.argument, "--ready-fd", str(request.ready_fd)]
        if request.extra_fd is not None:
            child_argv += [credential_channel.ARGUMENT, str(request.extra_fd)]
        return main(child_argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s lazysnap-mount[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    if args.credentials_fd is not None:
        credential_channel.receive(args.credentials_fd)
    try:
        spec = _spec_from_args(args)
    except SpecError as exc:
        _Reporter(args.ready_fd).send(f"error: {exc}")
        log.error("%s", exc)
        return 2
    return run(spec, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
