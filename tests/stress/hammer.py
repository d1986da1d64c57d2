"""A reader process for the lazy-read stress test: hammers lazily mounted files with random reads
and compares every byte with the same file extracted locally by Python's tarfile (so a wrong
TOC offset is caught too, not only a wrong span).

    python -m tests.stress.hammer PLAN.json

PLAN.json: {"seconds": S, "threads": T, "seed": N, "cgroup_procs": path or "",
            "files": [{"mounts": [dir, ...], "rel": path, "reference": path, "size": n,
                       "boundaries": [file offsets of span boundaries inside the file]}]}

Prints one JSON summary line on stdout: counts, and the first mismatches and errors with what
was read where. Reads are pread (random, across span boundaries, at and past EOF), mmap
(pages touched in random order, as an exec'd binary is), sequential reads with assorted buffer
sizes, running a static busybox from the mount, and fadvise(DONTNEED), which drops the file's
clean pages so the next read goes back to FUSE. A mismatch is re-read after dropping the page
cache, to tell a wrong page the kernel
kept from wrong bytes FUSE serves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REPORTS = 20
PAGE = 4096
EXEC_SHARE = 0.05  # of all operations: runs of the busybox binary


@dataclass
class FilePlan:
    mounts: list[str]
    rel: str
    reference: str
    size: int
    boundaries: list[int]
    executable: bool = False  # a static busybox: run it (its pages are faulted in via mmap)


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    mmaps: int = 0
    execs: int = 0
    drops: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    mismatch_count: int = 0
    error_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mismatch(self, report: dict[str, Any]) -> None:
        with self.lock:
            self.mismatch_count += 1
            if len(self.mismatches) < MAX_REPORTS:
                self.mismatches.append(report)

    def error(self, report: dict[str, Any]) -> None:
        with self.lock:
            self.error_count += 1
            if len(self.errors) < MAX_REPORTS:
                self.errors.append(report)

    def count(self, reads: int, nbytes: int) -> None:
        with self.lock:
            self.reads += reads
            self.bytes += nbytes


class Hammer:
    def __init__(self, files: list[FilePlan], tally: Tally, seed: int) -> None:
        self.files = files
        self.tally = tally
        self.rng = random.Random(seed)

    def expected(self, plan: FilePlan, offset: int, length: int) -> bytes:
        # pread of the extracted copy: page cache (reclaimable under the memory limit), not
        # a private copy of every file in each thread
        fd = _reference_fd(plan)
        return os.pread(fd, max(0, min(length, plan.size - offset)), offset)

    def run(self, deadline: float) -> None:
        operations = (
            (self.pread_random, 5),
            (self.pread_boundary, 5),
            (self.pread_eof, 2),
            (self.mmap_pages, 3),
            (self.sequential, 1),
            (self.drop_pages, 2),
        )
        weighted = [op for op, weight in operations for _ in range(weight)]
        executables = [plan for plan in self.files if plan.executable]
        while time.monotonic() < deadline:
            if executables and self.rng.random() < EXEC_SHARE:
                plan, op = self.rng.choice(executables), self.execute
            else:
                plan, op = self.rng.choice(self.files), self.rng.choice(weighted)
            path = os.path.join(self.rng.choice(plan.mounts), plan.rel)
            try:
                op(plan, path)
            except OSError as exc:
                self.tally.error(
                    {
                        "op": op.__name__,
                        "path": path,
                        "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        "error": str(exc),
                    }
                )

    # -- operations ----------------------------------------------------------------------------

    def pread_random(self, plan: FilePlan, path: str) -> None:
        offset = self.rng.randrange(plan.size + 1)
        length = self.rng.choice((1, 17, PAGE, 65536, 131072, 1 << 20, 3 << 20))
        self._pread_check(plan, path, offset, length, "pread_random")

    def pread_boundary(self, plan: FilePlan, path: str) -> None:
        if not plan.boundaries:
            return self.pread_random(plan, path)
        edge = self.rng.choice(plan.boundaries)
        offset = max(0, edge - self.rng.choice((0, 1, 7, PAGE, 65536, 1 << 20)))
        length = self.rng.choice((1, 2, 8, PAGE + 3, 131072, 1 << 20, 5 << 20))
        self._pread_check(plan, path, offset, length, "pread_boundary")

    def pread_eof(self, plan: FilePlan, path: str) -> None:
        offset = max(0, plan.size - self.rng.choice((0, 1, 100, PAGE, 70000)))
        offset += self.rng.choice((0, 0, 1, PAGE, 1 << 20))  # some reads start past the end
        self._pread_check(plan, path, offset, self.rng.choice((1, PAGE, 1 << 20)), "pread_eof")

    def _pread_check(self, plan: FilePlan, path: str, offset: int, length: int, op: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        want = self.expected(plan, offset, length)
        self.tally.count(1, len(got))
        if got != want:
            self._report(plan, path, op, offset, got, want)

    def mmap_pages(self, plan: FilePlan, path: str) -> None:
        if plan.size == 0:
            return
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            if len(mapped) != plan.size:
                raise RuntimeError(f"{path}: mmap of {len(mapped)} bytes, expected {plan.size}")
            pages = list(range(0, plan.size, PAGE))
            self.rng.shuffle(pages)
            for start in pages[:256]:
                got = mapped[start : start + PAGE]
                want = self.expected(plan, start, PAGE)
                if got != want:
                    self._report(plan, path, "mmap", start, got, want)
                    break
            self.tally.count(min(len(pages), 256), min(len(pages), 256) * PAGE)
        with self.tally.lock:
            self.tally.mmaps += 1

    def sequential(self, plan: FilePlan, path: str) -> None:
        if plan.size > 8 << 20:
            return self.pread_random(plan, path)  # whole-file reads of big files: too slow
        chunk = self.rng.choice((4096, 10000, 65536, 1 << 20))
        parts = []
        with open(path, "rb", buffering=0) as f:
            while data := f.read(chunk):
                parts.append(data)
        got = b"".join(parts)
        self.tally.count(len(parts), len(got))
        want = self.expected(plan, 0, plan.size)
        if got != want:
            self._report(plan, path, f"sequential/{chunk}", 0, got, want)

    def execute(self, plan: FilePlan, path: str) -> None:
        """Run the binary, as the profile test's busybox runs: a wrong or zero-filled code page
        shows up as a crash (SIGSEGV/SIGILL/SIGBUS) or wrong output."""
        if not plan.executable:
            return self.mmap_pages(plan, path)
        if self.rng.random() < 0.5:
            self.drop_pages(plan, path)  # so the exec faults its pages in through FUSE
        script = "x=0; while [ $x -lt 200 ]; do x=$((x+1)); done; echo $x"
        result = subprocess.run(
            [path, "sh", "-c", script], capture_output=True, timeout=60, check=False
        )
        self.tally.count(1, 0)
        with self.tally.lock:
            self.tally.execs += 1
        if result.returncode != 0 or result.stdout != b"200\n":
            self.tally.mismatch(
                {
                    "op": "execute",
                    "path": path,
                    "returncode": result.returncode,
                    "stdout": result.stdout[:200].decode(errors="replace"),
                    "stderr": result.stderr[-500:].decode(errors="replace"),
                }
            )

    def drop_pages(self, plan: FilePlan, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        with self.tally.lock:
            self.tally.drops += 1

    # -- reporting -----------------------------------------------------------------------------

    def _report(
        self, plan: FilePlan, path: str, op: str, offset: int, got: bytes, want: bytes
    ) -> None:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if first is None:
            first = min(len(got), len(want))
        # Re-read with the page cache dropped: same wrong bytes = FUSE served them.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            again = os.pread(fd, len(want) or 1, offset)
        finally:
            os.close(fd)
        self.tally.mismatch(
            {
                "op": op,
                "path": path,
                "offset": offset,
                "got_len": len(got),
                "want_len": len(want),
                "first_diff": first,
                "got": got[first : first + 16].hex(),
                "want": want[first : first + 16].hex(),
                "got_sha256": hashlib.sha256(got).hexdigest()[:16],
                "reread_ok": again == want,
            }
        )


_reference_fds: dict[str, int] = {}
_reference_lock = threading.Lock()


def _reference_fd(plan: FilePlan) -> int:
    with _reference_lock:
        fd = _reference_fds.get(plan.reference)
        if fd is None:
            fd = os.open(plan.reference, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_size != plan.size:
                raise RuntimeError(f"reference {plan.reference}: not {plan.size} bytes")
            _reference_fds[plan.reference] = fd
        return fd


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[1]).read_text())
    if plan.get("cgroup_procs"):
        # join the memory cgroup before reading anything, so every page is charged to it
        with open(plan["cgroup_procs"], "w") as procs:
            procs.write(str(os.getpid()))
    files = [FilePlan(**f) for f in plan["files"]]
    tally = Tally()
    deadline = time.monotonic() + plan["seconds"]
    threads = [
        threading.Thread(target=Hammer(files, tally, plan["seed"] * 1000 + n).run, args=(deadline,))
        for n in range(plan["threads"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = {
        "reads": tally.reads,
        "bytes": tally.bytes,
        "mmaps": tally.mmaps,
        "execs": tally.execs,
        "drops": tally.drops,
        "mismatch_count": tally.mismatch_count,
        "error_count": tally.error_count,
        "mismatches": tally.mismatches,
        "errors": tally.errors,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
