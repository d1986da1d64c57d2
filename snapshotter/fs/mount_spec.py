"""The spec a mount process is started with (`--spec FILE`): what the daemon writes beside the
mountpoint (lazylayers/layer_spec.py) and the mount process and the completion check read back.
No FUSE code: the daemon and `lazysnap status` import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.fs.background import DEFAULT_QUIET_S, DEFAULT_RATE_BYTES, BackgroundSettings
from snapshotter.fs.blob_source import BlobSpec, BlobSpecError
from snapshotter.fs.reader import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_READ_AHEAD_SPANS,
    DEFAULT_READ_AROUND_SCOPE,
    DEFAULT_WORKERS,
    READ_AROUND_SCOPES,
)
from snapshotter.index.model import LayerIndex
from snapshotter.index.pack import LayerPack, PackError, layer_pack_from_json
from snapshotter.sidecars import read_spec

# The program a spec is given to: `python -m MOUNT_PROCESS_MODULE --spec FILE` (also how its
# processes are recognised in /proc, forked ones included).
MOUNT_PROCESS_MODULE = "snapshotter.fs.mount_process"
READ_AHEAD_KB = 4096  # makes the kernel send 1 MiB FUSE reads (limits.md §1)
# The read-ahead of a mount while its start-up pack serves, and of the mounts a profile is
# recorded on: the pack holds the bytes the recording's FUSE reads covered, and at 4 MiB the
# kernel's read-around turns a fault in a shared object into a read of nearly the whole file
# (docs/startup-profile.md). Raised to read_ahead_kb once the pack is released or failed.
PACK_READ_AHEAD_KB = 128
# The read-ahead of a mount while its layer's start goes on (until the background fetch
# starts): the same read-around at 4 MiB fetches, without a pack, the spans of nearly every
# byte of each shared object a start touches (docs/benchmarks.md, "Span layouts").
START_READ_AHEAD_KB = 128
OOM_SCORE_ADJ = -500  # below containers (their processes should go first), above containerd
STATE_INTERVAL_S = 2.0


def range_log_path(access_log: str) -> str:
    """Where a recording mount logs the byte ranges read, beside its access log."""
    return access_log + ".ranges"


class SpecError(ValueError):
    """A mount spec that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class MountSpec:
    mountpoint: str
    index_path: str  # the encoded index (snapshotter.index.codec)
    blob: BlobSpec
    cache_dir: str
    cache_max_bytes: int
    # Free space the cache leaves on its filesystem (fs.disk_reserve.DiskReserve); 0/0: none.
    cache_min_free_bytes: int = 0
    cache_min_free_percent: float = 0.0
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    workers: int = DEFAULT_WORKERS
    allow_other: bool = True
    state_interval: float = STATE_INTERVAL_S
    read_ahead_spans: int = DEFAULT_READ_AHEAD_SPANS  # largest read-ahead window; 0: off
    read_around_bytes: int = 0  # read-around budget on a miss (reader.LayerReader); 0: off
    read_around_scope: str = DEFAULT_READ_AROUND_SCOPE
    read_ahead_kb: int = READ_AHEAD_KB
    start_read_ahead_kb: int = START_READ_AHEAD_KB  # until the background fetch starts
    # Entry names to fetch right after mounting, in order (the image's startup profile), on top
    # of the index's own prefetch list; prefetch=False fetches neither.
    prefetch_names: tuple[str, ...] = ()
    prefetch: bool = True
    # This layer's section of the image's start-up pack (from the signed profile): fetched at
    # start when prefetch is on, then reads inside its ranges are served from it.
    pack: LayerPack | None = None
    background: bool = True
    background_quiet_seconds: float = DEFAULT_QUIET_S
    background_rate_bytes: int = DEFAULT_RATE_BYTES
    # Profile recording: append "<monotonic ns> <entry name>" here on each file's first read.
    access_log: str = ""
    # Our /proc/self/oom_score_adj: the OOM killer picking a mount process strands every
    # container reading its layer (lazylayers/deaths.py).
    oom_score_adj: int = OOM_SCORE_ADJ
    # What the completion check (lazylayers/completion.py) and its records need: the layer's diffID
    # from the image config ("" unknown), and where the index came from.
    diff_id: str = ""
    index_digest: str = ""
    artifact_digest: str = ""
    image: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "index_path": self.index_path,
            "blob": self.blob.to_json(),
            "cache_dir": self.cache_dir,
            "cache_max_bytes": self.cache_max_bytes,
            "cache_min_free_bytes": self.cache_min_free_bytes,
            "cache_min_free_percent": self.cache_min_free_percent,
            "fetch_timeout": self.fetch_timeout,
            "workers": self.workers,
            "allow_other": self.allow_other,
            "state_interval": self.state_interval,
            "read_ahead_spans": self.read_ahead_spans,
            "read_around_bytes": self.read_around_bytes,
            "read_around_scope": self.read_around_scope,
            "read_ahead_kb": self.read_ahead_kb,
            "start_read_ahead_kb": self.start_read_ahead_kb,
            "prefetch_names": list(self.prefetch_names),
            "prefetch": self.prefetch,
            "pack": self.pack.to_json() if self.pack is not None else None,
            "background": self.background,
            "background_quiet_seconds": self.background_quiet_seconds,
            "background_rate_bytes": self.background_rate_bytes,
            "access_log": self.access_log,
            "oom_score_adj": self.oom_score_adj,
            "diff_id": self.diff_id,
            "index_digest": self.index_digest,
            "artifact_digest": self.artifact_digest,
            "image": self.image,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "spec") -> MountSpec:
        if not isinstance(obj, dict):
            raise SpecError(f"{source}: expected a JSON object")

        def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
            value = obj.get(key, default)
            if value is None or (isinstance(value, bool) and kind is not bool):
                raise SpecError(f"{source}: {key} is missing or invalid")
            if not isinstance(value, kind):
                raise SpecError(f"{source}: {key} must be {_kind_name(kind)}, not {value!r}")
            return value

        try:
            blob = BlobSpec.from_json(obj.get("blob"))
        except BlobSpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
        try:
            pack = layer_pack_from_json(obj["pack"]) if obj.get("pack") is not None else None
        except PackError as exc:
            raise SpecError(f"{source}: {exc}") from None
        spec = cls(
            mountpoint=get("mountpoint", str),
            index_path=get("index_path", str),
            blob=blob,
            cache_dir=get("cache_dir", str),
            cache_max_bytes=get("cache_max_bytes", int),
            cache_min_free_bytes=get("cache_min_free_bytes", int, 0),
            cache_min_free_percent=float(get("cache_min_free_percent", (int, float), 0.0)),
            fetch_timeout=float(get("fetch_timeout", (int, float), DEFAULT_FETCH_TIMEOUT_S)),
            workers=get("workers", int, DEFAULT_WORKERS),
            allow_other=get("allow_other", bool, True),
            state_interval=float(get("state_interval", (int, float), STATE_INTERVAL_S)),
            read_ahead_spans=get("read_ahead_spans", int, DEFAULT_READ_AHEAD_SPANS),
            read_around_bytes=get("read_around_bytes", int, 0),
            read_around_scope=get("read_around_scope", str, DEFAULT_READ_AROUND_SCOPE),
            read_ahead_kb=get("read_ahead_kb", int, READ_AHEAD_KB),
            start_read_ahead_kb=get("start_read_ahead_kb", int, START_READ_AHEAD_KB),
            prefetch_names=tuple(get("prefetch_names", list, [])),
            prefetch=get("prefetch", bool, True),
            pack=pack,
            background=get("background", bool, True),
            background_quiet_seconds=float(
                get("background_quiet_seconds", (int, float), DEFAULT_QUIET_S)
            ),
            background_rate_bytes=get("background_rate_bytes", int, DEFAULT_RATE_BYTES),
            access_log=get("access_log", str, ""),
            oom_score_adj=get("oom_score_adj", int, OOM_SCORE_ADJ),
            diff_id=get("diff_id", str, ""),
            index_digest=get("index_digest", str, ""),
            artifact_digest=get("artifact_digest", str, ""),
            image=get("image", str, ""),
        )
        if (
            min(
                spec.cache_max_bytes,
                spec.workers,
                spec.fetch_timeout,
                spec.read_ahead_kb,
                spec.start_read_ahead_kb,
            )
            <= 0
        ):
            raise SpecError(
                f"{source}: cache_max_bytes, workers, fetch_timeout, read_ahead_kb and "
                "start_read_ahead_kb must be > 0"
            )
        if spec.cache_min_free_bytes < 0 or not 0 <= spec.cache_min_free_percent <= 50:
            raise SpecError(
                f"{source}: cache_min_free_bytes must be >= 0 and cache_min_free_percent "
                "within 0..50"
            )
        if not all(isinstance(name, str) for name in spec.prefetch_names):
            raise SpecError(f"{source}: prefetch_names must be a list of entry names")
        if not -1000 <= spec.oom_score_adj <= 1000:
            raise SpecError(f"{source}: oom_score_adj must be between -1000 and 1000")
        if spec.read_ahead_spans < 0:
            raise SpecError(f"{source}: read_ahead_spans must be >= 0 (0 turns read-ahead off)")
        if spec.read_around_bytes < 0 or spec.read_around_scope not in READ_AROUND_SCOPES:
            raise SpecError(
                f"{source}: read_around_bytes must be >= 0 (0 turns read-around off) and "
                f"read_around_scope one of {', '.join(READ_AROUND_SCOPES)}"
            )
        if spec.background_quiet_seconds < 0 or spec.background_rate_bytes <= 0:
            raise SpecError(
                f"{source}: background_quiet_seconds must be >= 0 and background_rate_bytes > 0"
            )
        return spec

    def background_settings(self) -> BackgroundSettings:
        return BackgroundSettings(
            enabled=self.background,
            quiet_seconds=self.background_quiet_seconds,
            rate_bytes=self.background_rate_bytes,
        )

    @classmethod
    def load(cls, path: str) -> MountSpec:
        try:
            obj = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SpecError(f"mount spec {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise SpecError(f"mount spec {path}: not JSON: {exc}") from None
        return cls.from_json(obj, source=f"mount spec {path}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def load_index(path: str) -> LayerIndex:
    from snapshotter.index.codec import decode_index

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"index file {path}: {exc.strerror}") from None
    try:
        return decode_index(data)
    except Exception as exc:  # the codec's own errors name what is wrong; add the file
        raise SpecError(f"index file {path}: {exc}") from None


@dataclass(frozen=True)
class IndexFacts:
    """What `lazysnap status` shows of the index a mount process was started with."""

    layer_size: int  # compressed bytes of the layer blob
    spans: int


def index_facts(mountpoint: str) -> IndexFacts | None:
    """The facts of the index the spec beside mountpoint names; None if the spec or the index
    does not read (no spec: not mounted lazily now)."""
    spec = read_spec(mountpoint)
    path = spec.get("index_path") if spec else None
    if not isinstance(path, str):
        return None
    try:
        index = load_index(path)
    except SpecError:
        return None
    return IndexFacts(index.compressed_size, len(index.spans))
