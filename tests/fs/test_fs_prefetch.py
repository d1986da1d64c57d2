"""The startup prefetch: which spans a list of names means (computed before the layer's tree
exists, so it must agree with the tree), and that the list keeps more than one request in
flight, so a slow link is not idle between them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs import prefetch as prefetch_module
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.prefetch import PREFETCH_IN_FLIGHT
from snapshotter.fs.reader import LayerReader
from snapshotter.fs.tree import LayerTree
from snapshotter.index.model import LayerIndex
from snapshotter.index.spans import fetch_range, spans_for_files, spans_for_range
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members

TIMEOUT = 10.0


@pytest.fixture
def layer() -> Iterator[tuple[LayerIndex, BlobServer]]:
    # uncompressed: spans of exactly SPAN_SIZE, so a big file crosses several
    blob = compress(make_tar(rich_members()), "tar")
    server = BlobServer(blob)
    yield built_index(blob, "tar"), server
    server.stop()


def _tree_spans(index: LayerIndex, tree: LayerTree, name: str) -> list[int]:
    node = tree.lookup(name)
    if node is None or node.data is None or node.data.size == 0:
        return []
    return list(spans_for_range(index, node.data.offset, node.data.offset + node.data.size))


def test_the_spans_of_each_name_are_those_its_file_in_the_tree_reads(
    layer: tuple[LayerIndex, BlobServer],
) -> None:
    index, _ = layer
    tree = LayerTree.from_index(index)
    names = [path for path, _ in tree.walk() if path]
    assert "etc/dup" in names and "usr/bin/tool-link" in names  # last entry wins; a hard link
    for name in names:
        assert spans_for_files(index, [name]) == _tree_spans(index, tree, name), name
    # leading "/" and "./" as a profile may write them; dirs, symlinks, empty and absent files
    # hold no data
    assert spans_for_files(index, ["/usr/bin/tool", "./usr/bin/tool"]) == _tree_spans(
        index, tree, "usr/bin/tool"
    )
    assert spans_for_files(index, ["etc", "etc/link", "etc/empty", "no/such/file"]) == []


def test_spans_come_in_the_order_of_the_names_each_once(
    layer: tuple[LayerIndex, BlobServer],
) -> None:
    index, _ = layer
    big = spans_for_files(index, ["usr/lib/big.bin"])
    exact = spans_for_files(index, ["usr/lib/exact.bin"])
    assert len(big) >= 5 and exact
    both = spans_for_files(index, ["usr/lib/exact.bin", "usr/lib/big.bin", "usr/lib/exact.bin"])
    assert both == exact + [n for n in big if n not in exact]


def test_the_prefetch_keeps_a_bounded_number_of_requests_in_flight(
    layer: tuple[LayerIndex, BlobServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, server = layer
    monkeypatch.setattr(prefetch_module, "PREFETCH_STEP_BYTES", 1)  # one span per step
    spans = spans_for_files(index, ["usr/lib/big.bin"])
    assert len(spans) > PREFETCH_IN_FLIGHT + 1
    held = threading.Event()
    starts = [fetch_range(index, n)[0] for n in spans]
    for start in starts:
        server.gates[start] = held
    blob = UrlBlobSource(server.url, timeout=TIMEOUT, digest=index.layer_digest)
    reader = LayerReader(index, blob, SpanCache(tmp_path / "cache", 1 << 30), fetch_timeout=TIMEOUT)
    try:
        reader.prefetch(spans)
        deadline = time.monotonic() + TIMEOUT
        # The first requests are all out while none of them has been answered...
        server.wait_for_requests(PREFETCH_IN_FLIGHT, TIMEOUT)
        time.sleep(0.3)  # a third request would be out by now: nothing to wait for
        # ...and no more than that: a read arriving now still finds the rest unclaimed.
        # (the two steps' threads may send in either order)
        assert sorted(first for first, _ in server.requests) == starts[:PREFETCH_IN_FLIGHT]
        held.set()
        while not all(reader.is_cached(n) for n in spans):
            assert time.monotonic() < deadline, "the prefetch never finished"
            time.sleep(0.02)
        assert sorted(first for first, _ in server.requests) == sorted(starts)
        assert reader.counters().prefetch_spans == len(spans)
    finally:
        held.set()
        reader.close()
