"""The completion check: once every span of a layer is cached, is it what the image promises?

Spans are verified against the index's digests, but the index itself comes from beside the
image, not from it: a forged index can keep every span digest consistent with the real blob and
still remap a file onto another file's bytes, change modes, add setuid files or devices, or (with
a forged gzip window and a recomputed uncompressed digest) make spans inflate to bytes that are
in no image at all. So before a layer is copied to plain files (materialize) - and whether or
not it will be - the whole uncompressed tar stream is read back from the span cache, in span
order, through SpanCache.read (each span file hashed against its digest again), and:

1. hashed: the sha256 must equal the layer's diffID from the image config (rootfs.diff_ids).
   containerd names the snapshot by chain ID, a function of the diffIDs, so this binds the bytes
   served lazily to the image's own digest chain;
2. re-parsed from byte 0 with the project's own tar parser (not through the index): the TOC it
   yields must equal the index's TOC field by field, in order (index/toc_compare.py).

Memory stays bounded (one chunk of one span at a time, plus the TOC the index already holds).
It runs as a helper process at background priority (`python -m snapshotter.lazylayers.completion
--spec FILE`, under nice 19 and the idle I/O class), never on the daemon's GIL; the daemon runs
it through CompletionCheck and reads one JSON line from its stdout. Before each chunk it looks
at the node's busy gate (fs/activity.py) and waits while a container starts, so a start that
comes while it runs shares the cores with one chunk of it at most.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from snapshotter.fs.activity import BusyGate, NodeActivity
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.clock import SYSTEM_CLOCK, Clock
from snapshotter.fs.low_priority import HELPER_PREFIX
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import LayerIndex
from snapshotter.index.tar_toc import TarTocParser
from snapshotter.index.toc_compare import first_difference
from snapshotter.lazylayers.helper_process import CancellableProcess, HelperCancelled

HELPER_MODULE = "snapshotter.lazylayers.completion"
# Bytes of a span read (and hashed, parsed) at a time: a few ms of one core, so a start that
# comes meanwhile waits for little before the check pauses.
CHUNK = 1 << 20

PASSED = "passed"
FAILED = "failed"
INCOMPLETE = "incomplete"  # a span is not (or no longer) in the cache: try again later


class CheckError(Exception):
    """The check could not run (helper failed to start or answer); not a verdict."""


@dataclass(frozen=True)
class CheckReport:
    result: str  # PASSED | FAILED | INCOMPLETE
    detail: str
    bytes_checked: int = 0
    diff_id_checked: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "result": self.result,
            "detail": self.detail,
            "bytes_checked": self.bytes_checked,
            "diff_id_checked": self.diff_id_checked,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, obj: object) -> CheckReport:
        if not isinstance(obj, dict) or obj.get("result") not in (PASSED, FAILED, INCOMPLETE):
            raise CheckError(f"completion check helper answered {obj!r:.200}")
        return cls(
            result=str(obj["result"]),
            detail=str(obj.get("detail", "")),
            bytes_checked=int(obj.get("bytes_checked", 0)),
            diff_id_checked=bool(obj.get("diff_id_checked", False)),
            seconds=float(obj.get("seconds", 0.0)),
        )


class Pacer:
    """Keeps a loop at or under rate_bytes per second (None: as fast as it goes): the check
    shares the node with containers, and hashing at full speed slowed their reads by up to
    28 % even at nice 19 (docs/benchmarks.md, "Completion check")."""

    def __init__(
        self,
        rate_bytes: int | None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.rate_bytes = rate_bytes
        self._clock = clock
        self._started = clock.monotonic()
        self._done = 0
        self._never = threading.Event()  # the pause is the clock's alone

    def account(self, count: int) -> None:
        if not self.rate_bytes:
            return
        self._done += count
        ahead = self._done / self.rate_bytes - (self._clock.monotonic() - self._started)
        if ahead > 0:
            self._clock.wait(self._never, ahead)


def check_layer(
    index: LayerIndex,
    cache: SpanCache,
    diff_id: str,
    *,
    chunk: int = CHUNK,
    pacer: Pacer | None = None,
    before_chunk: Callable[[], object] = lambda: None,
) -> CheckReport:
    """Read the layer's tar stream from the cache and compare it with the diffID (when given)
    and with the index's TOC. Never raises for what the bytes say: that is the verdict.
    before_chunk: called before each chunk is read (the helper waits there while the node is
    busy)."""
    pacer = pacer or Pacer(None)
    hasher = hashlib.sha256()
    parser = TarTocParser()
    parse_error = ""
    position = 0
    for number, span in enumerate(index.spans):
        size = span.uncompressed_size
        offset = 0
        while offset < size:
            length = min(chunk, size - offset)
            before_chunk()
            data = cache.read(
                index.layer_digest, number, offset, length, size, span.uncompressed_digest
            )
            if data is None:
                return CheckReport(
                    INCOMPLETE, f"span {number} of {index.layer_digest} is not in the span cache"
                )
            hasher.update(data)
            if not parse_error:
                try:
                    parser.feed(data)
                except InvalidLayer as exc:  # hashing goes on: the diffID verdict comes first
                    parse_error = f"the tar stream does not parse at byte {position}: {exc}"
            offset += length
            position += length
            pacer.account(length)
    stream_digest = "sha256:" + hasher.hexdigest()
    problems = []
    if diff_id and stream_digest != diff_id:
        problems.append(
            f"the uncompressed layer hashes to {stream_digest}, the image config's diffID is "
            f"{diff_id}"
        )
    if parse_error:
        problems.append(parse_error)
    else:
        try:
            parsed = parser.finish()
        except InvalidLayer as exc:
            problems.append(f"the tar stream does not parse: {exc}")
        else:
            difference = first_difference(index.entries, parsed)
            if difference is not None:
                problems.append(f"the index's TOC differs from the tar stream: {difference}")
    if problems:
        return CheckReport(FAILED, "; ".join(problems), position, bool(diff_id))
    checked = "diffID and TOC" if diff_id else "TOC only (no diffID known)"
    return CheckReport(PASSED, f"{checked} match ({position} bytes)", position, bool(diff_id))


class CompletionCheck:
    """One run of the check helper for one mount spec; cancel() from another thread ends it."""

    def __init__(self, spec_path: str, *, python: str = sys.executable) -> None:
        self.spec_path = spec_path
        self.python = python
        self._process = CancellableProcess()

    @property
    def cancelled(self) -> bool:
        return self._process.cancelled

    def command(self) -> list[str]:
        return [*HELPER_PREFIX, self.python, "-m", HELPER_MODULE, "--spec", self.spec_path]

    def run(self) -> CheckReport:
        """The helper's report; CheckError if it could not give one (or was cancelled)."""
        try:
            finished = self._process.run(self.command(), stdout=True)
        except HelperCancelled:
            raise CheckError("cancelled") from None
        except OSError as exc:
            raise CheckError(f"starting the completion check helper: {exc}") from exc
        lines = finished.stdout.decode(errors="replace").strip().splitlines()
        if finished.returncode != 0 or not lines:
            raise CheckError(finished.last_error_line())
        try:
            return CheckReport.from_json(json.loads(lines[-1]))
        except ValueError as exc:
            raise CheckError(f"completion check helper answered {lines[-1]!r:.200}") from exc

    def cancel(self) -> None:
        self._process.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {HELPER_MODULE}",
        description="Check a fully cached lazy layer against its diffID and its index's TOC "
        "(run by lazysnap serve at background priority); prints one JSON line.",
    )
    parser.add_argument("--spec", required=True, help="the layer's mount spec file")
    args = parser.parse_args(argv)
    from snapshotter.fs.cache_errors import CacheError
    from snapshotter.fs.mount_spec import MountSpec, SpecError, load_index

    clock = SYSTEM_CLOCK  # the helper's own process: real time
    started = clock.monotonic()
    try:
        spec = MountSpec.load(args.spec)
        index = load_index(spec.index_path)
        cache = SpanCache(spec.cache_dir, spec.cache_max_bytes)
    except (SpecError, CacheError) as exc:
        print(f"completion check of {args.spec}: {exc}", file=sys.stderr)
        return 1
    # Paced like background fetch: [fetch] background_rate_bytes, here uncompressed bytes;
    # paused, like it, while a container starts.
    gate = BusyGate(
        NodeActivity(spec.cache_dir, clock), spec.background_quiet_seconds, fetches=True
    )
    never = threading.Event()
    report = check_layer(
        index,
        cache,
        spec.diff_id,
        pacer=Pacer(spec.background_rate_bytes, clock),
        before_chunk=lambda: gate.pause_while_busy(never),
    )
    timed = CheckReport(
        report.result,
        report.detail,
        report.bytes_checked,
        report.diff_id_checked,
        clock.monotonic() - started,
    )
    print(json.dumps(timed.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
