"""Workloads and one measured trial: on a cold node, pull (timed), first run (timed), second
run (timed, warm), and the bytes the registry served for it (its access log)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.startup_images import READTIME_PATH, SEQREAD_FILE
from bench.startup_node import ColdNode
from harness.containerd import Containerd
from harness.daemon import LazysnapDaemon, lazysnap_command
from harness.procs import HarnessError, run
from harness.registry import Registry

FULL = "full"  # ctr images pull + ctr run on containerd's overlayfs snapshotter
LAZY = "lazysnap"  # lazysnap pull + ctr run --snapshotter lazysnap
# The same, from a repository whose index artifact carries a startup profile recorded with the
# workload's own command (`lazysnap index build --profile`), with its start-up pack (the bytes
# the workload read, fetched in one request at mount).
LAZY_PROFILE = "lazysnap+profile"
# The same profile without the pack (`--no-pack`): the spans of the profile's files are
# prefetched. Not run by default: pick it to compare pack and no pack in one run.
LAZY_PROFILE_NO_PACK = "lazysnap+profile-nopack"
DEFAULT_MODES = (FULL, LAZY, LAZY_PROFILE)
PROFILE_MODES = (LAZY_PROFILE, LAZY_PROFILE_NO_PACK)
# Like LAZY, from a repository indexed with `--no-static-profile`: the baseline of the static
# start-up profile (LAZY's artifact carries one). Not run by default either.
LAZY_NO_STATIC = "lazysnap-nostatic"
# Like LAZY, with the mounts' full read-ahead from the start (`[fuse] start_read_ahead_kb =
# 4096`, what every mount did before that key): the baseline of the small start read-ahead.
LAZY_START_RA4M = "lazysnap-ra4m"
# Like LAZY, with read-around on a miss (`[fetch] read_around_bytes = 262144`, scope directory:
# docs/benchmarks.md, "Where the bytes went").
LAZY_READ_AROUND = "lazysnap-around"
LAZY_MODES = (
    LAZY,
    LAZY_PROFILE,
    LAZY_PROFILE_NO_PACK,
    LAZY_NO_STATIC,
    LAZY_START_RA4M,
    LAZY_READ_AROUND,
)
MODES = (FULL, *LAZY_MODES)
_DAEMON_CONFIG = {
    LAZY_START_RA4M: "[fuse]\nstart_read_ahead_kb = 4096\n",
    LAZY_READ_AROUND: '[fetch]\nread_around_bytes = 262144\nread_around_scope = "directory"\n',
}


def daemon_config(mode: str) -> str:
    """What the mode adds to the daemon's config.toml."""
    return _DAEMON_CONFIG.get(mode, "")


def no_static_repository(image: str) -> str:
    """Where LAZY_NO_STATIC's copy of an image is indexed without a static profile."""
    return f"bench/nostatic-{image}"


FALLBACK_MARK = "falls back to a full pull"  # the daemon's one log line per non-lazy layer
LAZY_SUMMARY = re.compile(r"\((\d+) lazy")  # `lazysnap pull`: "N layers (L lazy, P pulled)"


@dataclass(frozen=True)
class Workload:
    name: str
    image: str  # key of startup_images.prepare_images
    command: tuple[str, ...]
    expect: str | None  # exact stdout; None: `readtime` output ("BYTES NS")
    title: str
    profiled: bool = True  # its image is indexed, so a startup profile can be recorded

    @property
    def profile_repository(self) -> str:
        """Where the image is pushed again to carry this workload's own startup profile (the
        repository differs, the manifest is the same: referrers are per repository)."""
        return f"bench/profile-{self.name}"

    def repository(self, mode: str) -> str:
        """The repository a mode pulls from: the profiled ones have their own."""
        if mode == LAZY_PROFILE:
            return self.profile_repository
        if mode == LAZY_PROFILE_NO_PACK:
            return f"bench/profile-nopack-{self.name}"
        if mode == LAZY_NO_STATIC:
            return no_static_repository(self.image)
        return f"bench/{self.image}"

    def modes(self) -> tuple[str, ...]:
        return MODES if self.profiled else (FULL, LAZY)


WORKLOADS = (
    # busybox's one layer is below min_layer_size: never indexed, so no profile either
    Workload(
        "busybox-echo", "busybox", ("echo", "hi"), "hi\n", "busybox `echo hi`", profiled=False
    ),
    Workload("py-print", "pybig", ("python3", "-c", "print(1)"), "1\n", "python `print(1)`"),
    Workload(
        "py-import",
        "pybig",
        ("python3", "-c", "import numpy, pandas"),
        "",
        "python `import numpy, pandas`",
    ),
    Workload("seqread", "seqread", (READTIME_PATH, SEQREAD_FILE), None, "sequential read"),
)
WORKLOADS_BY_NAME = {workload.name: workload for workload in WORKLOADS}


@dataclass
class TrialResult:
    """One (link, trial, workload, mode) measurement: a JSON line of results.jsonl."""

    run_id: str
    link: str
    trial: int
    workload: str
    mode: str
    pull_s: float | None = None
    first_run_s: float | None = None
    pull_first_run_s: float | None = None
    second_run_s: float | None = None
    bytes_pull: int | None = None  # registry blob bytes served during the pull
    bytes_first_run: int | None = None  # ... up to the end of the first run
    bytes_total: int | None = None  # ... up to the end of the second run
    blob_requests: int | None = None
    read_bytes: int | None = None  # seqread: file size read in the container
    read_cold_s: float | None = None
    read_warm_s: float | None = None
    # After the second run: lazysnap waits until background fetch and materialization made
    # every lazy layer a plain local directory (`lazysnap status --json`: all_local), then runs
    # a third time; the full pull runs its third time at once.
    converge_s: float | None = None  # from the end of the second run until all local
    converged_run_s: float | None = None
    read_converged_s: float | None = None
    lazy_layers: int | None = None  # lazysnap: layers mounted lazily (pull summary)
    fallback_layers: int | None = None  # lazysnap: layers the daemon pulled whole
    error: str | None = None
    kind: str = "trial"


def _fetched(registry: Registry, since: int, until: int | None = None) -> tuple[int, int]:
    fetches = registry.blob_fetches(since, until)
    return sum(f.bytes for f in fetches.values()), sum(f.requests for f in fetches.values())


def _check_output(workload: Workload, output: str) -> tuple[int, float] | None:
    """Raise if the container printed something else than the workload's answer; for
    readtime return (bytes, seconds)."""
    if workload.expect is not None:
        if output != workload.expect:
            raise HarnessError(f"{workload.name}: expected {workload.expect!r}, got {output!r}")
        return None
    try:
        size, nanoseconds = (int(word) for word in output.split())
    except ValueError:
        raise HarnessError(f"{workload.name}: readtime printed {output!r}") from None
    return size, nanoseconds / 1e9


def measure(
    node: ColdNode,
    registry: Registry,
    workload: Workload,
    mode: str,
    reference: str,
    result: TrialResult,
    pull_argv: list[str],
    log_dir: Path,
    progress: Callable[[str], None],
    converge_timeout: float | None = None,
) -> TrialResult:
    """Fill result for one trial; the node must have just been reset (cold).
    converge_timeout: also measure the converged run, waiting at most that long for it."""
    containerd, daemon = node.running()
    try:
        _measure_steps(
            node,
            containerd,
            registry,
            workload,
            mode,
            reference,
            result,
            pull_argv,
            log_dir,
            progress,
        )
        if converge_timeout is not None:
            _measure_converged(
                containerd,
                daemon,
                workload,
                mode,
                reference,
                result,
                converge_timeout,
                progress,
            )
    finally:
        if mode in LAZY_MODES:  # also (above all) when a step failed: the daemon log says why
            result.fallback_layers = daemon.log().count(FALLBACK_MARK)
            name = _log_name(result, workload)
            shutil.copyfile(daemon.log_path, log_dir / f"{name}-daemon.log")
            _collect_mount_logs(daemon.root, log_dir / f"{name}-mounts.log")
    return result


STATUS_POLL_S = 0.5


def _timed_run(
    containerd: Containerd, reference: str, workload: Workload, mode: str
) -> tuple[float, tuple[int, float] | None]:
    """One `ctr run --rm` of the workload: (seconds, readtime's (bytes, seconds) or None)."""
    start = time.perf_counter()
    output = containerd.run_container(
        reference,
        *workload.command,
        snapshotter="overlayfs" if mode == FULL else "lazysnap",
        container_id=f"lzb-{secrets.token_hex(4)}",
        timeout=900,
    )
    return time.perf_counter() - start, _check_output(workload, output)


def _all_local(daemon: LazysnapDaemon, expected: int) -> bool:
    """`lazysnap status --json` says at least `expected` layers, all of them local."""
    argv = [*lazysnap_command(), "status", "--root", str(daemon.root), "--json"]
    if daemon.config is not None:
        argv += ["--config", str(daemon.config)]
    report = json.loads(run(argv, "lazysnap status --json", timeout=60).stdout)
    return bool(report.get("all_local")) and int(report.get("layers_local", 0)) >= expected


def _measure_converged(
    containerd: Containerd,
    daemon: LazysnapDaemon,
    workload: Workload,
    mode: str,
    reference: str,
    result: TrialResult,
    timeout: float,
    progress: Callable[[str], None],
) -> None:
    if mode in LAZY_MODES and result.lazy_layers:
        progress("waiting for every lazy layer to become local")
        start = time.perf_counter()
        while not _all_local(daemon, result.lazy_layers):
            if time.perf_counter() - start > timeout:
                progress(f"not local after {timeout:.0f} s: no converged run")
                return
            time.sleep(STATUS_POLL_S)
        result.converge_s = time.perf_counter() - start
    progress("converged run")
    result.converged_run_s, read = _timed_run(containerd, reference, workload, mode)
    if read is not None:
        result.read_converged_s = read[1]


def _log_name(result: TrialResult, workload: Workload) -> str:
    suffix = {
        LAZY_PROFILE: "-profile",
        LAZY_PROFILE_NO_PACK: "-profile-nopack",
        LAZY_NO_STATIC: "-nostatic",
        LAZY_START_RA4M: "-ra4m",
        LAZY_READ_AROUND: "-around",
    }.get(result.mode, "")
    return f"{result.link}-t{result.trial}-{workload.name}{suffix}"


def _collect_mount_logs(root: Path, out: Path) -> None:
    """Concatenate the FUSE mount processes' logs (ROOT/snapshots/<id>/fs.lazysnap.log, beside
    each mountpoint). A glob one level deep only: walking into a lazy mount would fetch it."""
    logs = sorted((root / "snapshots").glob("*/*.lazysnap.log"))
    if logs:
        out.write_text("".join(f"==> {log} <==\n{log.read_text(errors='replace')}" for log in logs))


def _measure_steps(
    node: ColdNode,
    containerd: Containerd,
    registry: Registry,
    workload: Workload,
    mode: str,
    reference: str,
    result: TrialResult,
    pull_argv: list[str],
    log_dir: Path,
    progress: Callable[[str], None],
) -> None:
    progress("pull")
    since = registry.log_offset()
    start = time.perf_counter()
    if mode == FULL:
        containerd.pull(reference, snapshotter="overlayfs")
    else:
        pulled = run(
            [
                *pull_argv,
                reference,
                "--address",
                str(containerd.address),
                "--namespace",
                containerd.namespace,
                "--hosts-dir",
                str(node.hosts_dir),
                # run by the node's daemon, as a user's `lazysnap pull` is where it runs
                *(["--daemon-address", str(node.daemon.socket)] if node.daemon else []),
            ],
            f"lazysnap pull {reference}",
            timeout=1800,
        )
        (log_dir / f"{_log_name(result, workload)}-pull.txt").write_text(
            pulled.stdout + pulled.stderr
        )
        lazy = LAZY_SUMMARY.search(pulled.stdout + pulled.stderr)
        result.lazy_layers = int(lazy.group(1)) if lazy else None
    result.pull_s = time.perf_counter() - start
    # Only the access log's current end here: counting waits for the log to settle, and a
    # wait between the pull and the first run would let mounts get ready and prefetches run
    # off the clock. The first run starts at once; bytes are counted after the second.
    pull_end = registry.log_offset()
    runs: list[tuple[float, tuple[int, float] | None]] = []
    first_run_end = pull_end
    for ordinal in ("first", "second"):
        progress(f"{ordinal} run")
        runs.append(_timed_run(containerd, reference, workload, mode))
        if ordinal == "first":
            first_run_end = registry.log_offset()
    (result.first_run_s, first_read), (result.second_run_s, second_read) = runs
    result.pull_first_run_s = result.pull_s + result.first_run_s
    result.bytes_pull, _ = _fetched(registry, since, pull_end)
    result.bytes_first_run, _ = _fetched(registry, since, first_run_end)
    result.bytes_total, result.blob_requests = _fetched(registry, since)
    if first_read is not None and second_read is not None:
        result.read_bytes, result.read_cold_s = first_read
        result.read_warm_s = second_read[1]
