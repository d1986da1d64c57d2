"""A hung registry (accepts the request, never answers) costs a read one fetch timeout, however
many requests the read arrives as, and a fetch stuck in it keeps no span from being fetched
again later. LayerReader against a real HTTP server, no FUSE (tests/fs/test_fs_reader_fuse.py
has the kernel's side)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.fs.blob_source import UrlBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.fs.span_states import LATE_RESULT_GRACE_S, RETRY_AFTER_FAILURE_S
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members

FETCH_TIMEOUT = 1.5
SLACK = 0.4  # thread start-up and scheduling on a loaded 2-core machine


@pytest.fixture
def layer() -> tuple[bytes, LayerIndex, bytes]:
    tar = make_tar(rich_members())
    blob = compress(tar, "gzip")
    return tar, built_index(blob, "gzip"), blob


@dataclass
class HungServer:
    """A blob server whose every Range request waits until released."""

    server: BlobServer
    hang: threading.Event

    def answer_new_requests(self) -> None:
        self.server.gates.clear()  # the requests already waiting keep waiting

    def release(self) -> None:
        self.answer_new_requests()
        self.hang.set()


@pytest.fixture
def hung(layer: tuple[bytes, LayerIndex, bytes]) -> Iterator[HungServer]:
    _, index, blob = layer
    server = BlobServer(blob)
    hang = threading.Event()
    server.gates = {fetch_range(index, n)[0]: hang for n in range(len(index.spans))}
    yield HungServer(server, hang)
    hang.set()
    server.stop()


def _entry(index: LayerIndex, name: str) -> TocEntry:
    return [e for e in index.entries if e.name == name][-1]


def _timed_read(reader: LayerReader, entry: TocEntry) -> tuple[bytes | SpanReadError, float]:
    started = time.monotonic()
    try:
        result: bytes | SpanReadError = reader.read(entry, 0, 100)
    except SpanReadError as exc:
        result = exc
    return result, time.monotonic() - started


def test_a_hung_registry_costs_one_timeout_per_read_not_per_request(
    layer: tuple[bytes, LayerIndex, bytes], hung: HungServer, tmp_path: Path
) -> None:
    tar, index, _ = layer
    big = _entry(index, "usr/lib/big.bin")
    # A blob source that does not give up within the fetch timeout by itself (a registry
    # trickling bytes defeats a socket timeout): the reader's deadline is all that bounds a read.
    blob = UrlBlobSource(hung.server.url, timeout=60, digest=index.layer_digest)
    reader = LayerReader(index, blob, SpanCache(tmp_path, 1 << 30), fetch_timeout=FETCH_TIMEOUT)
    try:
        # The kernel's way: a readahead request, then (before it ends) the read of the same page.
        results: dict[str, tuple[bytes | SpanReadError, float]] = {}
        readahead = threading.Thread(target=lambda: results.update(ra=_timed_read(reader, big)))
        started = time.monotonic()
        readahead.start()
        time.sleep(0.5)
        page, _ = _timed_read(reader, big)
        page_done = time.monotonic() - started
        readahead.join()
        assert isinstance(results["ra"][0], SpanReadError), results
        assert isinstance(page, SpanReadError), page
        assert results["ra"][1] <= FETCH_TIMEOUT + SLACK
        assert page_done <= FETCH_TIMEOUT + SLACK, (
            f"the second request of one read ended {page_done:.1f} s after the first began"
        )
        # Asked again at once (the kernel re-requesting the page that just failed): no second
        # timeout, and no second request to the hung registry.
        again, took = _timed_read(reader, big)
        assert isinstance(again, SpanReadError) and took < LATE_RESULT_GRACE_S + 0.2, (again, took)
        assert hung.server.request_count() == 1

        # The registry answers new requests again; the first one is still stuck in it.
        hung.answer_new_requests()
        time.sleep(RETRY_AFTER_FAILURE_S)
        recovered, took = _timed_read(reader, big)
        assert recovered == tar[big.offset : big.offset + big.size][:100]
        assert took < FETCH_TIMEOUT, "the stuck fetch still held the span"
    finally:
        reader.close()
        blob.close()


def test_reads_fail_in_time_when_every_fetch_worker_is_stuck_and_work_once_one_is_free(
    layer: tuple[bytes, LayerIndex, bytes], hung: HungServer, tmp_path: Path
) -> None:
    tar, index, _ = layer
    files = [e for e in index.entries if e.size > 0 and e.name.startswith("usr/")]
    blob = UrlBlobSource(hung.server.url, timeout=60, digest=index.layer_digest)
    reader = LayerReader(
        index, blob, SpanCache(tmp_path, 1 << 30), workers=1, fetch_timeout=FETCH_TIMEOUT
    )
    try:
        first, took = _timed_read(reader, files[0])
        assert isinstance(first, SpanReadError) and took <= FETCH_TIMEOUT + SLACK
        # The only worker is stuck in the registry: a read of other spans queues behind it and
        # still fails by its own deadline, without its request ever being sent.
        second, took = _timed_read(reader, files[-1])
        assert isinstance(second, SpanReadError) and took <= FETCH_TIMEOUT + SLACK
        assert hung.server.request_count() == 1
        hung.release()
        time.sleep(RETRY_AFTER_FAILURE_S)
        # The freed worker dropped the fetch its readers had given up on instead of sending it
        # late; the next read sends its own.
        assert hung.server.request_count() == 1
        entry = files[-1]
        assert reader.read(entry, 0, 100) == tar[entry.offset : entry.offset + entry.size][:100]
        assert hung.server.request_count() == 2
    finally:
        reader.close()
        blob.close()
