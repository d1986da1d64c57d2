"""Read parts of a layer's files through its index, as a mount would: the spans holding the
range are fetched (Range requests), verified and inflated. For the static start-up profile,
which reads a few KiB of a few dozen files (ELF headers, shebang lines, `.pth` files).

Every span read counts against one ReadBudget shared by all layers of an image, so a hostile
image (thousands of libraries, a huge dynamic section) costs the builder a bounded number of
bytes; BudgetExhausted ends the analysis, keeping what it found until then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from snapshotter.index.codec import decode_window
from snapshotter.index.model import EntryType, LayerIndex, TocEntry
from snapshotter.index.spans import MAX_HARDLINK_HOPS, fetch_range, inflate_span, spans_for_range

# (offset, length) -> exactly those bytes of a blob (compressed layer, or windows blob)
BlobRead = Callable[[int, int], bytes]
SPANS_KEPT = 8  # inflated spans kept per layer: one ELF's headers and dynamic section


class BudgetExhausted(Exception):
    """The analysis read as much as it may; the message says which limit."""


@dataclass
class ReadBudget:
    max_spans: int = 64
    max_compressed_bytes: int = 96 << 20
    spans: int = 0
    compressed_bytes: int = 0

    def charge(self, compressed: int) -> None:
        if self.spans + 1 > self.max_spans:
            raise BudgetExhausted(f"read {self.spans} spans, the limit")
        if self.compressed_bytes + compressed > self.max_compressed_bytes:
            raise BudgetExhausted(f"read {self.compressed_bytes} compressed bytes, the limit")
        self.spans += 1
        self.compressed_bytes += compressed


class LayerFiles:
    """One layer: its index, where its compressed bytes come from, and (version-2 gzip
    index) where its windows blob's bytes come from."""

    def __init__(
        self,
        index: LayerIndex,
        read_blob: BlobRead,
        budget: ReadBudget,
        read_windows: BlobRead | None = None,
    ) -> None:
        if index.windows is not None and read_windows is None:
            raise ValueError(f"layer {index.layer_digest}: its index needs its windows blob")
        self.index = index
        self._read_blob = read_blob
        self._read_windows = read_windows
        self._budget = budget
        self._by_name = {entry.name: entry for entry in index.entries}
        self._spans: OrderedDict[int, bytes] = OrderedDict()

    def data_entry(self, entry: TocEntry) -> TocEntry | None:
        """The entry holding entry's data (a hard link's target), or None when there is none."""
        current: TocEntry | None = entry
        for _ in range(MAX_HARDLINK_HOPS):
            if current is None or current.type is not EntryType.HARDLINK:
                break
            current = self._by_name.get(current.link_target)
        return current if current is not None and current.type is EntryType.REG else None

    def read(self, entry: TocEntry, offset: int, length: int) -> bytes:
        """Up to length bytes of the file's data from offset (fewer at its end). Raises
        BudgetExhausted, or the index package's SpanVerificationError / InvalidIndex for
        bytes that do not match the index."""
        data = self.data_entry(entry)
        if data is None or offset >= data.size or length <= 0:
            return b""
        start = data.offset + offset
        end = data.offset + min(data.size, offset + length)
        parts = []
        for span_no in spans_for_range(self.index, start, end):
            span = self.index.spans[span_no]
            inflated = self._span(span_no)
            low = max(start, span.uncompressed_start) - span.uncompressed_start
            high = min(end, span.uncompressed_end) - span.uncompressed_start
            parts.append(inflated[low:high])
        return b"".join(parts)

    def _span(self, span_no: int) -> bytes:
        cached = self._spans.get(span_no)
        if cached is not None:
            self._spans.move_to_end(span_no)
            return cached
        span = self.index.spans[span_no]
        self._budget.charge(span.compressed_size)
        window: bytes | None = None
        if span.window_length and self._read_windows is not None:
            window = decode_window(self._read_windows(span.window_offset, span.window_length))
        start, end = fetch_range(self.index, span_no)
        inflated = inflate_span(self.index, span_no, self._read_blob(start, end - start), window)
        self._spans[span_no] = inflated
        while len(self._spans) > SPANS_KEPT:
            self._spans.popitem(last=False)
        return inflated
