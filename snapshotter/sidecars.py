"""The files beside a lazy layer's mountpoint: every name, and the reading and writing of each.

The daemon (snapshotter/lazylayers/), its mount processes (snapshotter/fs/mount_process.py)
and `lazysnap status` meet through these files, so their names live here and nowhere else:

    <mountpoint>.lazysnap.json          state: written by the mount process every few seconds
                                        (pid, layer digest, counters, background state)
    <mountpoint>.lazysnap-spec.json     the spec the mount process was started with (daemon)
    <mountpoint>.lazysnap-index         the encoded index, when discovery handed it over as bytes
    <mountpoint>.lazysnap.log           the mount process's log (EIO lines name span and cause)
    <mountpoint>.lazysnap-local         marker: the layer was copied into the plain directory under
                                        the mount and the FUSE mount detached; written atomically,
                                        fsynced, as the last step of a copy
    <mountpoint>.lazysnap-bind          an empty directory the copy helper binds the snapshot
                                        directory on (in its own mount namespace) and locks
    <mountpoint>.lazysnap-materialize-failed  why copying the layer gave up (JSON)
    <mountpoint>.lazysnap-check         the completion check's verdict: "passed", or "failed"
                                        with what differed; the mount process reads it and
                                        fails every read with EIO on "failed" (fail closed)
    <mountpoint>.lazysnap-deaths.json   the deaths of its mount processes (lazylayers/deaths.py
                                        owns the record's contents)

Standard library only: `lazysnap status` and the mount processes import it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapshotter.private_files import replace_private

STATE_SUFFIX = ".lazysnap.json"
SPEC_SUFFIX = ".lazysnap-spec.json"
INDEX_SUFFIX = ".lazysnap-index"
LOG_SUFFIX = ".lazysnap.log"
LOCAL_SUFFIX = ".lazysnap-local"
BIND_SUFFIX = ".lazysnap-bind"
MATERIALIZE_FAILED_SUFFIX = ".lazysnap-materialize-failed"
CHECK_SUFFIX = ".lazysnap-check"
DEATHS_SUFFIX = ".lazysnap-deaths.json"
# What a mount leaves only while it is mounted: unmount removes these (the verdict stays).
MOUNT_SUFFIXES = (STATE_SUFFIX, SPEC_SUFFIX, INDEX_SUFFIX)

PASSED = "passed"  # the completion check's results, as the verdict file spells them
FAILED = "failed"


class SidecarError(Exception):
    """A sidecar file could not be written; the message names the file."""


def sidecar_path(mountpoint: str, suffix: str) -> Path:
    """<mountpoint><suffix>: the file beside the mountpoint (never inside it)."""
    path = Path(mountpoint.rstrip("/") or "/")
    return path.with_name(path.name + suffix)


def state_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, STATE_SUFFIX)


def spec_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, SPEC_SUFFIX)


def index_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, INDEX_SUFFIX)


def log_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, LOG_SUFFIX)


def marker_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, LOCAL_SUFFIX)


def bind_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, BIND_SUFFIX)


def failure_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, MATERIALIZE_FAILED_SUFFIX)


def check_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, CHECK_SUFFIX)


def deaths_path(mountpoint: str) -> Path:
    return sidecar_path(mountpoint, DEATHS_SUFFIX)


def mountpoints_with(snapshots_dir: str, suffix: str) -> list[str]:
    """The mountpoints in <snapshots_dir>/<id>/ that have a suffix file, sorted."""
    return [str(path)[: -len(suffix)] for path in sorted(Path(snapshots_dir).glob(f"*/*{suffix}"))]


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- state (the mount process's) ------------------------------------------------------------------


def read_state(mountpoint: str) -> dict[str, Any] | None:
    """The mount process's state file, or None if it is missing or unreadable."""
    try:
        state = json.loads(state_path(mountpoint).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def state_pid(state: dict[str, Any] | None) -> int | None:
    """The pid a state file names, if it names one."""
    pid = state.get("pid") if state else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


@dataclass(frozen=True)
class MountState:
    """What a mount process last reported in its state file; a field that is missing or of the
    wrong type reads as empty (None, "", False)."""

    layer_digest: str
    pid: int | None
    updated_at: float | None  # time.time() of the last write
    cache_dir: str
    background: str  # off|waiting|fetching|complete|degraded|cache-full|stopped
    cache_disk_limited: bool  # spans served uncached: the cache's disk is at its reserve
    counters: dict[str, int]
    pack: str = ""  # the start-up pack: fetching|ready|failed|released; "" without one


def read_mount_state(mountpoint: str) -> MountState | None:
    """The mount process's state file as a MountState; None if it is missing or unreadable
    (being replaced right now, or damaged)."""
    state = read_state(mountpoint)
    if state is None:
        return None
    counters = state.get("counters")
    return MountState(
        layer_digest=_text(state.get("layer_digest")),
        pid=state_pid(state),
        updated_at=_optional_number(state.get("updated_at")),
        cache_dir=_text(state.get("cache_dir")),
        background=_text(state.get("background")),
        cache_disk_limited=state.get("cache_disk_limited") is True,
        pack=_text(state.get("pack")),
        counters={k: v for k, v in counters.items() if isinstance(v, int)}
        if isinstance(counters, dict)
        else {},
    )


def mountpoints_with_state(snapshots_dir: str) -> list[str]:
    """The mountpoints in <snapshots_dir>/<id>/ that have a state file, sorted."""
    return mountpoints_with(snapshots_dir, STATE_SUFFIX)


def write_state(mountpoint: str, state: dict[str, Any]) -> None:
    """Replace the state file (private, atomic); OSError as the caller reports it."""
    replace_private(state_path(mountpoint), (json.dumps(state, indent=1) + "\n").encode())


def read_spec(mountpoint: str) -> dict[str, Any] | None:
    """The mount's spec file as JSON (the daemon's MountSpec.to_json), or None."""
    try:
        spec = json.loads(spec_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def spec_blob_digest(mountpoint: str) -> str:
    """The blob digest in the mount's spec file; "" if there is none or it is unreadable."""
    try:
        digest = json.loads(spec_path(mountpoint).read_text())["blob"]["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return digest if isinstance(digest, str) else ""


# -- the local marker and the record of a copy given up on ----------------------------------------


@dataclass(frozen=True)
class LocalMarker:
    layer_digest: str
    materialized_at: float  # time.time() when the copy was complete

    def to_json(self) -> dict[str, object]:
        return {"layer_digest": self.layer_digest, "materialized_at": self.materialized_at}


def read_marker(mountpoint: str) -> LocalMarker | None:
    """The marker, or None if the layer is not local. A marker that is there but unreadable
    still means "local" (it is written atomically, so it was complete when written)."""
    try:
        data = json.loads(marker_path(mountpoint).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return LocalMarker("", 0.0)
    if not isinstance(data, dict):
        return LocalMarker("", 0.0)
    return LocalMarker(_text(data.get("layer_digest")), _number(data.get("materialized_at")))


def write_marker(mountpoint: str, marker: LocalMarker) -> None:
    """Write the marker atomically and durably (temp file, fsync, rename, fsync of the dir).
    Raises SidecarError naming the file."""
    _write_durably(marker_path(mountpoint), json.dumps(marker.to_json()) + "\n")


def remove_marker(mountpoint: str) -> None:
    remove(marker_path(mountpoint))


def write_failure(mountpoint: str, reason: str, attempts: int, when: float) -> None:
    """Record that copying the layer gave up (for `lazysnap status`), 0600; best effort."""
    record = {"reason": reason, "attempts": attempts, "gave_up_at": when}
    with contextlib.suppress(OSError):
        path = failure_path(mountpoint)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(record) + "\n")


def failure_reason(mountpoint: str) -> str:
    """Why copying the layer to plain files gave up, from its record; "" if it did not."""
    try:
        data = json.loads(failure_path(mountpoint).read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):
        return "gave up (its record is unreadable)"
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) and reason else "gave up"


def failure_recorded(mountpoint: str) -> bool:
    return failure_path(mountpoint).exists()


def remove_failure(mountpoint: str) -> None:
    remove(failure_path(mountpoint))


# -- the completion check's verdict ---------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The completion check's result for one mounted layer."""

    result: str  # PASSED | FAILED
    detail: str  # what differed (FAILED), or what was checked (PASSED)
    layer_digest: str = ""
    index_digest: str = ""
    diff_id: str = ""  # the diffID the stream was checked against ("" : TOC only)
    checked_at: float = 0.0

    @property
    def failed(self) -> bool:
        return self.result != PASSED

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_verdict(mountpoint: str) -> Verdict | None:
    """The verdict on the layer at mountpoint; None if it was not checked. A verdict file that
    is there but does not read as one counts as failed (fail closed)."""
    try:
        data = json.loads(check_path(mountpoint).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Verdict(FAILED, f"verdict file {check_path(mountpoint)} is unreadable")
    if not isinstance(data, dict) or data.get("result") not in (PASSED, FAILED):
        return Verdict(FAILED, f"verdict file {check_path(mountpoint)} is damaged")
    return Verdict(
        result=str(data["result"]),
        detail=_text(data.get("detail")),
        layer_digest=_text(data.get("layer_digest")),
        index_digest=_text(data.get("index_digest")),
        diff_id=_text(data.get("diff_id")),
        checked_at=_number(data.get("checked_at")),
    )


def write_verdict(mountpoint: str, verdict: Verdict) -> None:
    """Atomically and durably; SidecarError naming the file."""
    _write_durably(check_path(mountpoint), json.dumps(verdict.to_json()) + "\n")


def remove_verdict(mountpoint: str) -> None:
    remove(check_path(mountpoint))


def _write_durably(path: Path, text: str) -> None:
    try:
        replace_private(path, text.encode(), durable=True)
    except OSError as exc:
        raise SidecarError(f"writing {path}: {exc.strerror}") from exc


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _number(value: object) -> float:
    return _optional_number(value) or 0.0


def _optional_number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
