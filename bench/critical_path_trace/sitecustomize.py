"""Timeline tracing of lazysnap's processes for bench/critical_path.py (measurement only).

Python imports `sitecustomize` at start-up from the first sys.path entry that has one, so
putting this directory first on PYTHONPATH traces every python process of a run: `lazysnap
pull`, `lazysnap serve` and the mount processes it starts (they inherit the environment).

    LAZYSNAP_TRACE=FILE          append events to FILE (unset: this module does nothing)
    LAZYSNAP_TRACE_LEVEL=light   only process start and interpreter exit (default)
    LAZYSNAP_TRACE_LEVEL=full    also time the imports of TARGETS' modules and calls of the
                                 functions listed there

One tab-separated line per event, written with a single O_APPEND write so the lines of
concurrent processes do not interleave:

    PID  ROLE  EVENT  START  DURATION

ROLE: pull, daemon, mount or other:<program>; EVENT: proc-start, proc-exit (atexit: the
interpreter's own shutdown follows), import:<module>, <module tail>:<qualified function>, or
missing:<module>:<name> for a target the code under test does not have; START: epoch seconds;
DURATION: seconds, empty for the instant events.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_START = time.time()

# Module -> functions (Class.method or function) timed at level "full": the steps of a lazy
# pull's critical path (docs/benchmarks.md, "Critical path of a lazy pull").
TARGETS: dict[str, tuple[str, ...]] = {
    "snapshotter.pull.containerd_api": (
        "ContainerdClient.__init__",
        "ContainerdClient.connect",
        "ContainerdClient.content_info",
        "ContainerdClient.write_content",
        "ContainerdClient.stat_snapshot",
        "ContainerdClient.prepare_snapshot",
        "ContainerdClient.commit_snapshot",
        "ContainerdClient.update_content_labels",
        "ContainerdClient.put_image",
        "ContainerdClient.apply_layer",
    ),
    "snapshotter.pull.puller": (
        "Puller.pull",
        "Puller.unpack",
        "Puller._unpack_layer",
        "Puller._fetch_layer_blob",
    ),
    "snapshotter.pull.resolve": ("resolve_image",),
    "snapshotter.pull.command": ("run",),
    "snapshotter.remote.client": (
        "RegistryClient.get_manifest",
        "RegistryClient.get_blob",
        "RegistryClient.resolve_platform",
        "RegistryClient.request",
        "RegistryClient.stream_blob",
    ),
    "snapshotter.remote.referrers": ("find_referrers", "_referrers_api", "_tag_fallback", "_oras"),
    "snapshotter.source.discover": (
        "IndexDiscovery.__call__",
        "IndexDiscovery._lookup",
        "IndexDiscovery._index_blob",
        "IndexDiscovery._indexes_for",
        "IndexDiscovery._profile_names",
        "_fetch_index",
    ),
    "snapshotter.index.codec": ("decode_index",),
    "snapshotter.core.snapshotter": (
        "Snapshotter.prepare",
        "Snapshotter._prepare_remote",
        "Snapshotter._finish_remote",
        "Snapshotter.mounts",
        "Snapshotter.commit",
        "Snapshotter.view",
    ),
    "snapshotter.lazylayers.layers": (
        "LazyLayers.mount",
        "LazyLayers.check",
        "LazyLayers._await_startup",
        "LazyLayers._mount_layer",
    ),
    "snapshotter.lazylayers.supervisor": (
        "MountSupervisor.start",
        "MountSupervisor._watch_startup",
    ),
    "snapshotter.lazylayers.layer_spec": ("_write_atomically",),
    "snapshotter.fs.mount_spec": ("MountSpec.load", "load_index"),
    "snapshotter.fs.mount_process": (
        "run",
        "_Reporter.send",
        "_raise_read_ahead",
        "main",
    ),
    "snapshotter.index.spans": ("spans_for_files",),
    "snapshotter.fs.tree": ("LayerTree.from_index",),
    "snapshotter.fs.cache": ("SpanCache.__init__",),
    "snapshotter.fs.blob_source": ("open_blob_source",),
    "snapshotter.fs.fuse_ops": ("serve",),
    "snapshotter.fs.reader": ("LayerReader.__init__",),
}


def process_role(argv: Sequence[str]) -> str:
    """Which lazysnap process this is, from its command line as seen at start-up (for
    `python -m MODULE ARGS`, sys.argv is ['-m', ARGS...] until runpy replaces argv[0])."""
    args = list(argv[1:])
    if args[:1] == ["pull"]:
        return "pull"
    if args[:1] == ["serve"]:
        return "daemon"
    if "--spec" in args:
        return "mount"
    program = os.path.basename(argv[0]) if argv else "?"
    return f"other:{program}"


class _Tracer:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.prefix = f"{os.getpid()}\t{process_role(sys.argv)}\t"

    def emit(self, event: str, start: float, duration: float | None = None) -> None:
        took = "" if duration is None else f"{duration:.6f}"
        line = f"{self.prefix}{event}\t{start:.6f}\t{took}\n"
        with contextlib.suppress(OSError):  # a full disk must not break the measured process
            os.write(self.fd, line.encode())

    def timed(self, function: Callable[..., Any], event: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                self.emit(event, started, time.time() - started)

        return wrapper

    def instrument(self, module: ModuleType) -> None:
        tail = module.__name__.rsplit(".", 1)[-1]
        for qualified in TARGETS[module.__name__]:
            *path, name = qualified.split(".")
            owner: Any = module
            for part in path:
                owner = getattr(owner, part, None)
            target = getattr(owner, name, None) if owner is not None else None
            if not callable(target):
                self.emit(f"missing:{module.__name__}:{qualified}", time.time())
                continue
            setattr(owner, name, self.timed(target, f"{tail}:{qualified}"))


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds TARGETS' modules with the normal finders, then times their execution and wraps
    their functions once they are defined."""

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        sys.meta_path.remove(self)  # find_spec would otherwise come back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        execute = loader.exec_module
        tracer = self.tracer

        def exec_module(module: ModuleType) -> None:
            started = time.time()
            execute(module)
            tracer.emit(f"import:{fullname}", started, time.time() - started)
            tracer.instrument(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install() -> None:
    path = os.environ.get("LAZYSNAP_TRACE", "")
    if not path:
        return
    try:
        tracer = _Tracer(path)
    except OSError as exc:
        print(f"critical_path_trace: cannot open {path}: {exc.strerror}", file=sys.stderr)
        return
    tracer.emit("proc-start", _START)
    atexit.register(lambda: tracer.emit("proc-exit", time.time()))
    if os.environ.get("LAZYSNAP_TRACE_LEVEL", "light") == "full":
        sys.meta_path.insert(0, _ImportHook(tracer))


_install()
