"""What a profile recording's mount logs of the reads (profile/record.py reads the files after
unmounting): the first read of each file, and the pieces of the layer's uncompressed tar stream
the reads covered, each once (the start-up pack's ranges)."""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from typing import TextIO

from snapshotter.fs.mount_spec import range_log_path
from snapshotter.index.model import TocEntry


class AccessLog:
    """What a profile recording needs of the reads, flushed at once (the recorder reads the
    files after unmounting; lines of several layers' logs merge by time):
    - the access log: first read of each file, in order, one line
      "<CLOCK_MONOTONIC ns> <entry name as a JSON string>" per file;
    - beside it (mount_spec.range_log_path), the bytes read: one line
      "<ns> <tar start> <tar end> <file offset> <entry name as JSON>" per piece of the
      uncompressed tar stream no earlier read covered, in read order (the start-up pack's
      ranges)."""

    def __init__(self, path: str) -> None:
        self._file = self._open(path)
        self._ranges = self._open(range_log_path(path))
        self._seen: set[str] = set()
        self._covered = RangeSet()
        self._lock = threading.Lock()

    @staticmethod
    def _open(path: str) -> TextIO:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return open(fd, "a", encoding="ascii")

    def read(self, entry: TocEntry, offset: int, size: int) -> None:
        start = entry.offset + min(offset, entry.size)
        end = entry.offset + min(offset + size, entry.size)
        with self._lock:  # a recording, not a served mount: one lock per read is fine
            now = time.monotonic_ns()
            name = json.dumps(entry.name)
            if entry.name not in self._seen:
                self._seen.add(entry.name)
                self._file.write(f"{now} {name}\n")
                self._file.flush()
            new = self._covered.add(start, end)
            for lo, hi in new:
                self._ranges.write(f"{now} {lo} {hi} {lo - entry.offset} {name}\n")
            if new:
                self._ranges.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
            self._ranges.close()


class RangeSet:
    """Disjoint [start, end) intervals, merged when they touch."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add [start, end); the pieces of it not covered before, in order."""
        if start >= end:
            return []
        new: list[tuple[int, int]] = []
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] < start:
            i += 1  # the first interval that may touch [start, end)
        lo, hi, cursor = start, end, start
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            if self._starts[j] > cursor:
                new.append((cursor, self._starts[j]))
            cursor = max(cursor, self._ends[j])
            lo, hi = min(lo, self._starts[j]), max(hi, self._ends[j])
            j += 1
        if cursor < end:
            new.append((cursor, end))
        self._starts[i:j] = [lo]
        self._ends[i:j] = [hi]
        return new
