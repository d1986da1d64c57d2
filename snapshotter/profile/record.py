"""Record a startup profile: run a command in the image over lazy mounts of its layers and keep,
in order, the first read of every file.

1. Every layer is mounted lazily by its own mount process (the same code the snapshotter runs),
   without prefetch or background fetch, each logging its files' first reads: indexed layers
   from their index blob with the registry as blob source; unindexed (small) layers are
   downloaded and indexed on the spot, then served from the local copy.
2. In a private mount + PID namespace (unshare), an overlay of the layers (upper dir in the
   work dir, so the command may write), /proc, /dev and /sys, then chroot and run the command
   with the image's environment and working directory.
3. The command ends, or the timeout kills the namespace (a server never ends: what it read
   until then is its startup). Everything is unmounted and the work dir removed; when the
   command failed, the error keeps what the work dir's mount-process logs said (EIO lines) and
   the kernel's segfault lines naming the command, so a crash can still be diagnosed.
4. The layers' logs merge by time into one (layer digest, entry name) list. Before the layers
   are unmounted, a caller may read what the command read from them (while_mounted: the bytes
   of the start-up pack, profile/pack_build.py), from each layer's log of the byte ranges read.

Needs root (mount, unshare, chroot) and the host's unshare, mount and chroot programs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter import sidecars
from snapshotter.core.layers import RemoteLayerUnavailable
from snapshotter.fs.background import BackgroundSettings
from snapshotter.fs.blob_source import BlobSpec
from snapshotter.fs.mount_spec import PACK_READ_AHEAD_KB, range_log_path
from snapshotter.lazylayers.layer_spec import LayerSpec
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.profile.model import ProfileEntry, StartupProfile
from snapshotter.remote.access import RegistryAccess

log = logging.getLogger("lazysnap.profile")

DEFAULT_TIMEOUT_S = 60.0
RECORD_CACHE_BYTES = 64 << 30  # the recording's own throwaway cache: never the limit
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_TAIL_LINES = 40  # of each layer's mount-process log, kept in a failed recording's error
_LOG_TAIL_BYTES = 16 << 10
_MAX_LINE = 1000  # an EIO line names layer and span before its cause
_COMM_LEN = 15  # the kernel names a task by the first 15 bytes of its executable's name

# Runs as PID 1 of the new namespaces: everything it mounts disappears with them.
_NAMESPACE_SCRIPT = """
set -e
root=$1 lowers=$2 upper=$3 work=$4 workdir=$5 mount=$6 chroot=$7
shift 7
"$mount" -t overlay overlay -o "lowerdir=$lowers,upperdir=$upper,workdir=$work" "$root"
for dir in proc dev sys; do mkdir -p "$root/$dir"; done
"$mount" -t proc proc "$root/proc"
"$mount" --rbind /dev "$root/dev"
"$mount" --rbind /sys "$root/sys"
if [ "$workdir" = / ]; then exec "$chroot" "$root" "$@"; fi
exec "$chroot" "$root" /bin/sh -c 'mkdir -p "$0" && cd "$0" && exec "$@"' "$workdir" "$@"
"""


@dataclass(frozen=True)
class ReadPiece:
    """Bytes [start, end) of a layer's uncompressed tar stream that the command read first
    (no earlier read covered them): the data of entry name from file_offset."""

    start: int
    end: int
    file_offset: int
    name: str


@dataclass(frozen=True)
class MountedLayer:
    """A layer as the recording mounted it, with what the command read from it, in order."""

    digest: str
    mountpoint: Path
    pieces: tuple[ReadPiece, ...]


class ProfileRecordError(Exception):
    """Recording failed; the message names the image, layer or command."""


@dataclass(frozen=True)
class LayerSource:
    """One image layer, bottom first, as the recorder mounts it."""

    digest: str
    spec: LayerSpec


@dataclass(frozen=True)
class RunSettings:
    argv: tuple[str, ...]
    env: dict[str, str]
    workdir: str = "/"
    timeout: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Recording:
    profile: StartupProfile
    exit_status: int | None  # None: stopped by the timeout
    files: int


def image_run_settings(config: dict[str, Any], argv: Sequence[str], timeout: float) -> RunSettings:
    """Env and working directory from an OCI image config blob (its "config" object)."""
    inner = config.get("config") or {}
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    for item in inner.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            env[key] = value
    workdir = inner.get("WorkingDir") or "/"
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        workdir = "/"
    return RunSettings(tuple(argv), env, workdir, timeout)


def record_profile(
    layers: Sequence[LayerSource],
    run: RunSettings,
    *,
    command_text: str = "",
    work_root: str | None = None,
    lazy_layers: Callable[[str], LazyLayers] | None = None,
    while_mounted: Callable[[Sequence[MountedLayer]], None] | None = None,
) -> Recording:
    """Mount layers (bottom first), run the command over their overlay, return the profile.
    while_mounted, if given, is called once the command succeeded, before the unmount."""
    if not run.argv:
        raise ProfileRecordError("profile command is empty")
    if not layers:
        raise ProfileRecordError("the image has no layers to run the profile command in")
    tools = _host_tools()
    with tempfile.TemporaryDirectory(prefix="lazysnap-profile-", dir=work_root) as tmp:
        work = Path(tmp)
        manager = (lazy_layers or _recording_layers)(str(work / "cache"))
        mountpoints: list[Path] = []
        logs: list[Path] = []
        try:
            for number, layer in enumerate(layers):
                mountpoint = work / "l" / str(number)
                mountpoint.mkdir(parents=True)
                log_path = work / f"access-{number}.log"
                log_path.touch()
                try:
                    manager.mount_layer(str(mountpoint), layer.spec, access_log=str(log_path))
                except RemoteLayerUnavailable as exc:
                    raise ProfileRecordError(f"layer {layer.digest}: {exc}") from None
                mountpoints.append(mountpoint)
                logs.append(log_path)
            started = time.clock_gettime(time.CLOCK_MONOTONIC)
            status = _run_in_namespace(work, mountpoints, run, tools)
            if while_mounted is not None and status in (None, 0):
                while_mounted(
                    [
                        MountedLayer(layer.digest, mountpoint, tuple(_read_pieces(path)))
                        for layer, mountpoint, path in zip(layers, mountpoints, logs, strict=True)
                    ]
                )
        finally:
            for mountpoint in reversed(mountpoints):
                manager.unmount(str(mountpoint))
        if status not in (None, 0):
            # The work dir, with the mount processes' logs, goes with this error: keep what
            # explains a crash (EIO lines, the kernel's segfault line) in the message.
            layer_logs = [
                (layer.digest, sidecars.log_path(str(mountpoint)))
                for layer, mountpoint in zip(layers, mountpoints, strict=True)
            ]
            raise ProfileRecordError(
                f"profile command {command_text or ' '.join(run.argv)!r} {_ended(status)}; "
                f"nothing recorded"
                + _diagnostics(layer_logs, kernel_faults(run.argv, since=started - 1.0))
            )
        entries = _merge_logs(
            [(layer.digest, path) for layer, path in zip(layers, logs, strict=True)]
        )
    profile = StartupProfile(tuple(entries), command_text or " ".join(run.argv))
    return Recording(profile, status, len(entries))


def _recording_layers(cache_dir: str) -> LazyLayers:
    return LazyLayers(
        LazyLayerSettings(
            cache_dir,
            RECORD_CACHE_BYTES,
            prefetch=False,  # a prefetch would hide the order the command reads in
            read_ahead_kb=PACK_READ_AHEAD_KB,  # what a mount serving the pack reads with
            background=BackgroundSettings(enabled=False),
            allow_other=True,
        )
    )


def _host_tools() -> dict[str, str]:
    tools = {}
    for name in ("unshare", "mount", "chroot"):
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path is None:
            raise ProfileRecordError(f"recording a profile needs the host program {name!r}")
        tools[name] = path
    if os.geteuid() != 0:
        raise ProfileRecordError("recording a profile needs root (it mounts the image's layers)")
    return tools


def _run_in_namespace(
    work: Path, mountpoints: list[Path], run: RunSettings, tools: dict[str, str]
) -> int | None:
    """The command's exit status, or None if the timeout stopped it."""
    root, upper, overlay_work = work / "root", work / "upper", work / "work"
    for directory in (root, upper, overlay_work):
        directory.mkdir()
    lowers = ":".join(str(m) for m in reversed(mountpoints))  # overlay lists the top layer first
    argv = [
        tools["unshare"],
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "/bin/sh",
        "-c",
        _NAMESPACE_SCRIPT,
        "lazysnap-profile",
        str(root),
        lowers,
        str(upper),
        str(overlay_work),
        run.workdir,
        tools["mount"],
        tools["chroot"],
        *run.argv,
    ]
    log.info("recording: %s (timeout %gs)", " ".join(run.argv), run.timeout)
    child = subprocess.Popen(
        argv, env=run.env, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/"
    )
    try:
        return child.wait(timeout=run.timeout)
    except subprocess.TimeoutExpired:
        log.info(
            "profile command still running after %gs: stopped, keeping what it read", run.timeout
        )
        return None
    finally:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _ended(status: int) -> str:
    if status < 0:
        return f"was killed by {_signal_name(-status)}"
    if status > 128 and (name := _signal_name(status - 128, "")):
        return f"exited with status {status} (128 + {name}: a shell's child was killed)"
    return f"exited with status {status}"


def _signal_name(number: int, unknown: str | None = None) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}" if unknown is None else unknown


def _diagnostics(layer_logs: list[tuple[str, Path]], faults: list[str]) -> str:
    parts = []
    for digest, path in layer_logs:
        lines = log_tail(path, LOG_TAIL_LINES)
        # A log of INFO lines only (mounted, unmounted) says nothing about the failure.
        if any(" INFO " not in line for line in lines):
            parts.append(f"\nmount process log of layer {digest} (last {len(lines)} lines):")
            parts.extend(f"  {line}" for line in lines)
    if faults:
        parts.append("\nkernel log:")
        parts.extend(f"  {line}" for line in faults)
    return "\n".join(parts)


def log_tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log file (each cut to a readable length); [] if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line[:_MAX_LINE] for line in text.splitlines() if line.strip()][-lines:]


def kernel_faults(argv: Sequence[str], *, since: float) -> list[str]:
    """Kernel log lines since `since` (CLOCK_MONOTONIC seconds) saying that a program named in
    argv segfaulted; [] when the kernel log is not readable (no CAP_SYSLOG, no /dev/kmsg)."""
    names = {
        os.path.basename(word)[:_COMM_LEN]
        for arg in argv
        for word in arg.split()
        if not word.startswith("-") and os.path.basename(word)
    }
    found = []
    for stamp, message in _kernel_messages():
        if stamp >= since and "segfault" in message and any(f"{n}[" in message for n in names):
            found.append(message[:_MAX_LINE])
    return found


def _kernel_messages() -> list[tuple[float, str]]:
    """(seconds since boot, message) of the records in /dev/kmsg; its timestamps are the
    monotonic clock's (what dmesg shows in brackets)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    records = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:  # read to the end
                break
            except BrokenPipeError:  # records overwritten while we read: go on from the next
                continue
            except OSError:
                break
            if not record:
                break
            header, _, message = record.decode(errors="replace").partition(";")
            fields = header.split(",")
            if len(fields) >= 3 and fields[2].isdigit():
                records.append((int(fields[2]) / 1e6, message.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return records


def _merge_logs(logs: list[tuple[str, Path]]) -> list[ProfileEntry]:
    """All layers' first reads, ordered by time (ties keep layer order)."""
    timed: list[tuple[int, int, ProfileEntry]] = []
    for number, (digest, path) in enumerate(logs):
        for line_no, line in enumerate(path.read_text(encoding="ascii").splitlines()):
            stamp, _, name_json = line.partition(" ")
            try:
                name = json.loads(name_json)
                when = int(stamp)
            except ValueError:
                raise ProfileRecordError(
                    f"access log {path} line {line_no + 1}: {line!r}"
                ) from None
            timed.append((when, number, ProfileEntry(digest, name)))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [entry for _, _, entry in timed]


def _read_pieces(access_log: Path) -> list[ReadPiece]:
    """The byte ranges a layer's mount logged beside its access log, in read order."""
    pieces = []
    path = Path(range_log_path(str(access_log)))
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    for line_no, line in enumerate(text.splitlines()):
        parts = line.split(" ", 4)
        try:
            start, end, file_offset = int(parts[1]), int(parts[2]), int(parts[3])
            name = json.loads(parts[4])
        except (ValueError, IndexError):
            raise ProfileRecordError(f"range log {path} line {line_no + 1}: {line!r}") from None
        if not isinstance(name, str) or not 0 <= start < end or file_offset < 0:
            raise ProfileRecordError(f"range log {path} line {line_no + 1}: {line!r}")
        pieces.append(ReadPiece(start, end, file_offset, name))
    return pieces


def registry_layer_spec(
    repository: str,
    digest: str,
    size: int,
    index_bytes: bytes,
    access: RegistryAccess,
) -> LayerSpec:
    return LayerSpec(
        blob=BlobSpec(
            kind="registry",
            location=repository,
            digest=digest,
            size=size,
            access=access,
        ),
        index_bytes=index_bytes,
    )
