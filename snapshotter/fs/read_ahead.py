"""Read-ahead policies: which spans to fetch before a read needs them.

When the reads of a file move forward span by span (a read reaches the span right after the
furthest span the file's previous reads reached), the next spans of that file are fetched
ahead, as one Range request per contiguous run, on the fetch pipeline's workers, so the
inflate of the next spans overlaps serving this one. The window grows as the kernel's does
(2, 4, 8 ... up to read_ahead_spans, and at most READ_AHEAD_MAX_BYTES compressed) and the next
window starts when the reads are half-way through the last one. A read that jumps elsewhere
starts over, so a random pattern fetches nothing it does not read. A read-ahead fetch that
fails quickly is not remembered: a read that joined it fetches the span again on demand, and
reads of other spans never see it (reader.LayerReader).

Read-around (ReadAround, off by default): a read that misses takes the spans after its missing
ones along in its request, up to a byte budget, within the file or its directory; for reads
that fault pages of a file in no order (a start mapping shared objects) read-ahead never fires.
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass

from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import spans_for_range

READ_AHEAD_FIRST_WINDOW = 2  # spans fetched ahead at the first sign of a sequential read
# Cap on one read-ahead window (compressed bytes): on a slow link, a window is what a read that
# jumps elsewhere may have to share the link with.
READ_AHEAD_MAX_BYTES = 8 << 20
# Files whose read position is remembered for read-ahead (the least recently read is dropped).
READ_AHEAD_STREAMS = 64
# Reads arrive on several FUSE threads, the kernel's own readahead several spans at once, so a
# read up to this many spans behind the furthest one is still part of the stream (not a jump).
READ_AHEAD_REORDER_SPANS = 8


@dataclass
class _Stream:
    """Where the reads of one file got to."""

    furthest_span: int  # the highest span any read of the stream touched
    window: int  # spans the last read-ahead window held; the next holds twice as many
    ahead_until: int  # the last span read ahead so far (furthest_span: none yet)


class ReadAheadPolicy:
    def __init__(self, index: LayerIndex, max_spans: int) -> None:
        """max_spans: the largest window, in spans (> 0)."""
        self.index = index
        self.max_spans = max_spans
        self._lock = threading.Lock()
        # File data offset -> its read stream, least recently read first.
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def window(self, entry: TocEntry, first: int, last: int) -> range:
        """The spans to fetch ahead after a read of entry's spans [first, last], cached or
        not; updates the file's stream."""
        key = entry.offset
        with self._lock:
            stream = self._streams.get(key)
            if stream is not None:
                self._streams.move_to_end(key)
            if (
                stream is None
                or first > stream.furthest_span + 1
                or last < stream.furthest_span - READ_AHEAD_REORDER_SPANS
            ):
                # a new file, or a jump: start over from here, nothing ahead yet
                self._streams[key] = _Stream(last, READ_AHEAD_FIRST_WINDOW // 2, last)
                if len(self._streams) > READ_AHEAD_STREAMS:
                    self._streams.popitem(last=False)
                return range(0)
            if last <= stream.furthest_span:
                return range(0)  # a re-read, or a late one: no step forward
            stream.furthest_span = last
            if stream.ahead_until - last > stream.window // 2:
                return range(0)  # not yet half-way through the last window
            begin = max(stream.ahead_until, last) + 1
            stop = min(
                begin + min(stream.window * 2, self.max_spans),
                spans_for_range(self.index, entry.offset, entry.offset + entry.size).stop,
            )
            budget = READ_AHEAD_MAX_BYTES
            for span_no in range(begin, stop):
                budget -= self.index.spans[span_no].compressed_size
                if budget < 0 and span_no > begin:
                    stop = span_no
                    break
            if begin >= stop:
                return range(0)
            stream.ahead_until = stop - 1
            stream.window = stop - begin
            return range(begin, stop)


READ_AROUND_SCOPES = ("file", "directory")


def directory_data_ends(index: LayerIndex) -> dict[str, int]:
    """Per directory, the end (uncompressed tar offset) of the data of its last regular file
    in the layer."""
    ends: dict[str, int] = {}
    for entry in index.entries:
        if entry.type is EntryType.REG and entry.size:
            directory = posixpath.dirname(entry.name)
            ends[directory] = max(ends.get(directory, 0), entry.offset + entry.size)
    return ends


class ReadAround:
    """Read-around on a miss: the spans after a read's missing ones that go along in its
    request, up to budget compressed bytes from the first missing span, never past the end of
    the scope: the file's own spans, or (`directory`) up to the end of the data of the last
    regular file of its directory in this layer (a start reads many small files of one
    directory, each its own span with file-aware cuts: docs/benchmarks.md, "Where the bytes
    went"). In tar order a subdirectory's files may lie before that end: the budget bounds
    what they add."""

    def __init__(self, index: LayerIndex, budget: int, scope: str) -> None:
        """budget: compressed bytes (> 0); scope: one of READ_AROUND_SCOPES."""
        if scope not in READ_AROUND_SCOPES:
            raise ValueError(f"read-around scope must be one of {READ_AROUND_SCOPES}: {scope!r}")
        self.index = index
        self.budget = budget
        self._directory_ends = directory_data_ends(index) if scope == "directory" else {}

    def candidates(self, entry: TocEntry, first_missing: int, last_missing: int) -> range:
        """Spans after last_missing to fetch along with the read's missing spans
        [first_missing, last_missing] (the caller stops at one cached or in flight)."""
        end = max(
            entry.offset + entry.size,
            self._directory_ends.get(posixpath.dirname(entry.name), 0),
        )
        stop = spans_for_range(self.index, entry.offset, end).stop
        spans = self.index.spans
        taken = spans[last_missing].compressed_end - spans[first_missing].compressed_start
        begin = last_missing + 1
        for span_no in range(begin, stop):
            taken += spans[span_no].compressed_size
            if taken > self.budget:
                return range(begin, span_no)
        return range(begin, max(begin, stop))
