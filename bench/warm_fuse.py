"""What a warm run still asks the FUSE processes, and what it costs: `import numpy, pandas` of
pybig over an overlay of its lazily mounted layers (straight after a cold run, so every span is
cached and the kernel has seen every file once) against the same overlay of the layers
extracted to a plain directory, interleaved, chrooted, no container runtime in between.

    sudo /opt/lazysnap-venv/bin/python -m bench.warm_fuse [--rounds 5] [--no-background]
        [--gap 6] [--materialize]

Back to back (--gap 0), the warm runs keep the node busy and the work that follows a cold run
(background fetch, completion check, with --materialize the copy to plain files) never starts
between them; with --gap longer than the quiet period (5 s) it has started when each round's
runs come, as when a second container starts a while after the first.

One more warm run is traced (`strace -f -e trace=read -e read=all` on every mount process:
each FUSE request's header names its opcode), so the request counts come from a run that is
not timed. Around every timed warm run, the CPU time each thread of the machine used during it
is taken from /proc (utime + stime, with its nice value and I/O priority class), so the output
names the post-start work that ran beside the import (`cpu_during_warm_runs`), and whether the
node's busy clock (fs/activity.py) saw the run start (`busy_gate_saw_warm_runs`). Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.images import read_layout
from harness.procs import run
from harness.registry import start_registry
from snapshotter.fs.activity import NodeActivity
from snapshotter.fs.background import BackgroundSettings
from snapshotter.index.model import MAX_INDEX_BLOB_SIZE
from snapshotter.lazylayers.layers import LazyLayers
from snapshotter.lazylayers.settings import LazyLayerSettings
from snapshotter.profile.record import registry_layer_spec
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.reference import Reference
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, indexed_layers

PYBIG = Path("/var/cache/lazysnap-test-images/pybig")
COMMAND = ("/usr/bin/python3", "-c", "import numpy, pandas")
OPCODES = {
    1: "LOOKUP",
    2: "FORGET",
    3: "GETATTR",
    5: "READLINK",
    14: "OPEN",
    15: "READ",
    17: "STATFS",
    18: "RELEASE",
    22: "GETXATTR",
    23: "LISTXATTR",
    25: "FLUSH",
    27: "OPENDIR",
    28: "READDIR",
    29: "RELEASEDIR",
    34: "ACCESS",
    36: "INTERRUPT",
    42: "BATCH_FORGET",
    44: "READDIRPLUS",
}
# strace's hex dump of a read's data: " | 00000  28 00 00 00 03 00 00 00 ..."
_DUMP = re.compile(r"\| 00000  ((?:[0-9a-f]{2} ){8})")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_IOPRIO_CLASSES = {0: "none", 1: "rt", 2: "be", 3: "idle"}


@dataclass(frozen=True)
class _ThreadCpu:
    label: str  # process (its command, short) / thread name, nice, I/O class
    ticks: int


def _label(pid: str, tid: str, fields: list[str]) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    words = [w.decode(errors="replace") for w in argv if w]
    module = next((w for w in words if w.startswith(("snapshotter.", "bench."))), "")
    command = module or " ".join(Path(w).name for w in words[:2])
    comm = fields[0]
    nice = int(fields[16])  # field 19 of stat: nice (0-based after the comm is cut off: 16)
    ioprio = _IOPRIO_CLASSES.get(_io_class(int(tid)), "?")
    return f"{command} / {comm} (nice {nice}, io {ioprio})"


def _io_class(tid: int) -> int:
    result: int = _LIBC.syscall(_SYS_IOPRIO_GET, 1, tid)  # IOPRIO_WHO_PROCESS: one thread
    return max(0, result) >> 13


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_IOPRIO_GET = 252  # x86_64


def _ours() -> set[str]:
    """This process's descendants (mount processes, helpers, the registry) and the kernel's
    threads (writeback): the machine is shared, other people's work is left out."""
    parents: dict[str, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[stat.parent.name] = text[text.rindex(")") + 2 :].split()[1]
    ours = {str(os.getpid()), "2"}
    changed = True
    while changed:
        added = {pid for pid, parent in parents.items() if parent in ours and pid not in ours}
        ours |= added
        changed = bool(added)
    return ours


def _thread_cpu() -> dict[str, _ThreadCpu]:
    """The CPU ticks so far of every thread of _ours(), by pid/tid."""
    found: dict[str, _ThreadCpu] = {}
    ours = _ours()
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        if task.parent.parent.name not in ours:
            continue
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        pid, tid = task.parent.parent.name, task.name
        found[f"{pid}/{tid}"] = _ThreadCpu(_label(pid, tid, [comm, *fields[1:]]), ticks)
    return found


def _cpu_used(before: dict[str, _ThreadCpu], after: dict[str, _ThreadCpu]) -> Counter[str]:
    used: Counter[str] = Counter()
    for key, thread in after.items():
        spent = thread.ticks - (before[key].ticks if key in before else 0)
        if spent > 0:
            used[thread.label] += spent
    return used


def _cache_drops() -> int:
    """Times anyone on the machine dropped the page cache or the dentry/inode caches so far
    (/proc/vmstat): a warm run after that is a cold one. The machine is shared, and other
    benchmarks (bench.startup's cold node, seqread) drop them machine-wide."""
    drops = 0
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name in ("drop_pagecache", "drop_slab"):
            drops += int(value)
    return drops


def _timed(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["chroot", str(root), *COMMAND], check=True, capture_output=True)
    return time.perf_counter() - start


def _overlay(lowers: list[Path], work: Path, name: str) -> Path:
    upper, scratch, merged = work / f"{name}-up", work / f"{name}-work", work / f"{name}-merged"
    for path in (upper, scratch, merged):
        path.mkdir()
    options = f"lowerdir={':'.join(str(p) for p in reversed(lowers))},upperdir={upper},"
    run(["mount", "-t", "overlay", "overlay", "-o", options + f"workdir={scratch}", str(merged)],
        "mount overlay")  # fmt: skip
    return merged


def _mount_pids(mountpoints: list[Path]) -> list[int]:
    pids = []
    for mountpoint in mountpoints:
        state = json.loads((mountpoint.parent / f"{mountpoint.name}.lazysnap.json").read_text())
        pids.append(int(state["pid"]))
    return pids


def _traced_requests(root: Path, pids: list[int], out: Path) -> Counter[str]:
    argv = ["strace", "-f", "-qq", "-e", "trace=read", "-e", "read=all", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches to every thread
    _timed(root)
    time.sleep(0.5)
    tracer.terminate()
    tracer.wait(10)
    counts: Counter[str] = Counter()
    for match in _DUMP.finditer(out.read_text(errors="replace")):
        header = bytes.fromhex(match.group(1).replace(" ", ""))
        opcode = int.from_bytes(header[4:8], "little")
        counts[OPCODES.get(opcode, str(opcode))] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_fuse", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-background", action="store_true", help="mounts without it")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds idle before each round")
    parser.add_argument("--materialize", action="store_true", help="copy complete layers")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lzwarm-", dir="/tmp"))
    registry = start_registry(work / "registry")
    lazy = LazyLayers(
        LazyLayerSettings(
            str(work / "cache"),
            8 << 30,
            background=BackgroundSettings(enabled=not args.no_background),
            materialize=args.materialize and not args.no_background,
        )
    )
    mountpoints: list[Path] = []
    overlays: list[Path] = []
    try:
        image = read_layout(PYBIG, "latest")
        reference = f"{registry.host}/bench/pybig:latest"
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
             f"oci:{PYBIG}:latest", f"docker://{reference}"], "push")  # fmt: skip
        run([sys.executable, "-m", "snapshotter.cli", "index", "build", reference,
             "--plain-http", "--no-static-profile"], "index build", timeout=1800)  # fmt: skip
        access = RegistryAccess(plain_http=(registry.host,))
        ref = Reference.parse(reference)
        plain = work / "plain"
        plain.mkdir()
        for layer in image.layers:
            blob = PYBIG / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
            run(["tar", "-xzf", str(blob), "-C", str(plain)], "extract")
        with access.client() as client:
            from snapshotter.remote.referrers import find_referrers

            found = find_referrers(client, ref.repository, image.manifest_digest, ARTIFACT_TYPE)
            artifact = client.get_manifest(ref.with_digest(found.descriptors[-1].digest))
            by_layer = {i.layer_digest: i for i in indexed_layers(artifact)}
            for number, layer in enumerate(image.layers):
                mountpoint = work / "l" / str(number)
                mountpoint.mkdir(parents=True)
                index = client.get_blob(
                    ref.repository, by_layer[layer.digest].index_digest, MAX_INDEX_BLOB_SIZE
                )
                spec = registry_layer_spec(
                    str(ref.repository), layer.digest, layer.size, index, access
                )
                # As the daemon's: the completion check hashes against it, and only a layer
                # checked against its diffID is copied to plain files.
                spec = dataclasses.replace(spec, diff_id=layer.diff_id)
                lazy.mount_layer(str(mountpoint), spec)
                mountpoints.append(mountpoint)
        lazy_root = _overlay(mountpoints, work, "lazy")
        plain_root = _overlay([plain], work, "plain")
        overlays += [lazy_root, plain_root]
        result: dict[str, Any] = {
            "command": " ".join(COMMAND),
            "background": not args.no_background,
            "materialize": args.materialize and not args.no_background,
            "gap_s": args.gap,
        }
        result["lazy_cold_s"] = _timed(lazy_root)
        result["plain_first_s"] = _timed(plain_root)
        times: dict[str, list[float]] = {"lazy": [], "plain": []}
        cpu: dict[str, Counter[str]] = {"lazy": Counter(), "plain": Counter()}
        activity = NodeActivity(work / "cache")
        gate_saw = []
        dropped = []  # rounds in which someone dropped the machine's caches (gap included)
        for _ in range(args.rounds):
            drops = _cache_drops()
            time.sleep(args.gap)
            for kind, root in (("lazy", lazy_root), ("plain", plain_root)):
                before = _thread_cpu()
                times[kind].append(_timed(root))
                cpu[kind] += _cpu_used(before, _thread_cpu())
                if kind == "lazy":
                    gate_saw.append(activity.seconds_since_busy() <= times[kind][-1] + 0.05)
            dropped.append(_cache_drops() != drops)
        result["busy_gate_saw_warm_runs"] = gate_saw
        # CPU seconds per thread over all warm runs of each kind, the import's own left out.
        result["cpu_during_warm_runs"] = {
            kind: {
                label: round(ticks / _CLOCK_TICKS, 2)
                for label, ticks in used.most_common(12)
                if "python3 -c" not in label and ticks > 1
            }
            for kind, used in cpu.items()
        }
        result["warm_s"] = {k: [round(t, 3) for t in v] for k, v in times.items()}
        result["warm_median_ratio"] = round(
            statistics.median(times["lazy"]) / statistics.median(times["plain"]), 3
        )
        clean = [n for n in range(args.rounds) if not dropped[n]]
        result["rounds_with_caches_dropped"] = [n for n in range(args.rounds) if dropped[n]]
        if clean:
            result["warm_median_ratio_clean_rounds"] = round(
                statistics.median(times["lazy"][n] for n in clean)
                / statistics.median(times["plain"][n] for n in clean),
                3,
            )
        result["fuse_requests_warm_run"] = dict(
            _traced_requests(lazy_root, _mount_pids(mountpoints), work / "strace.txt")
        )
        print(json.dumps(result, indent=2))
    finally:
        for overlay in overlays:
            subprocess.run(["umount", str(overlay)], check=False)
        for mountpoint in reversed(mountpoints):
            lazy.unmount(str(mountpoint))
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
