"""A hung registry (accepts the request, never answers) costs a read one fetch timeout, however
many requests the read arrives as, and a fetch stuck in it keeps no span from being fetched
again later. LayerReader against a real HTTP server, no FUSE (tests/fs/test_fs_reader_fuse.py
has the kernel's side). Time is a manual clock: the tests move it past deadlines and fail-fast
windows once the reads wait on it, rather than sleeping through them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.url_blob import UrlBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader, SpanReadError
from snapshotter.fs.span_states import LATE_RESULT_GRACE_S, RETRY_AFTER_FAILURE_S
from snapshotter.index.model import LayerIndex, TocEntry
from snapshotter.index.spans import fetch_range
from tests.fs.fs_helpers import BlobServer, built_index, compress, make_tar, rich_members
from tests.fs.manual_clock import ManualClock

FETCH_TIMEOUT = 1.5
SLACK = 0.4  # the reads' own work, on the clock that bounds them


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


def _timed_read(
    reader: LayerReader, entry: TocEntry, clock: ManualClock
) -> tuple[bytes | SpanReadError, float]:
    started = clock.monotonic()
    try:
        result: bytes | SpanReadError = reader.read(entry, 0, 100)
    except SpanReadError as exc:
        result = exc
    return result, clock.monotonic() - started


class TimedRead(threading.Thread):
    """_timed_read on a thread of its own: a read that waits on the clock."""

    def __init__(self, reader: LayerReader, entry: TocEntry, clock: ManualClock) -> None:
        super().__init__(daemon=True)
        self.args_ = (reader, entry, clock)
        self.clock = clock
        self.outcome: tuple[bytes | SpanReadError, float] | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        self.outcome = _timed_read(*self.args_)
        self.ended_at = self.clock.monotonic()

    def result(self) -> tuple[bytes | SpanReadError, float]:
        self.join(10)
        assert self.outcome is not None, "the read did not end"
        return self.outcome


def _reader(
    index: LayerIndex, blob: UrlBlobSource, tmp_path: Path, clock: ManualClock, workers: int = 4
) -> LayerReader:
    cache = SpanCache(tmp_path, 1 << 30, clock=clock)
    return LayerReader(
        index, blob, cache, workers=workers, fetch_timeout=FETCH_TIMEOUT, clock=clock
    )


def test_a_hung_registry_costs_one_timeout_per_read_not_per_request(
    layer: tuple[bytes, LayerIndex, bytes], hung: HungServer, tmp_path: Path
) -> None:
    tar, index, _ = layer
    big = _entry(index, "usr/lib/big.bin")
    clock = ManualClock()
    # A blob source that does not give up within the fetch timeout by itself (a registry
    # trickling bytes defeats a socket timeout): the reader's deadline is all that bounds a read.
    blob = UrlBlobSource(hung.server.url, timeout=60, digest=index.layer_digest)
    reader = _reader(index, blob, tmp_path, clock)
    try:
        # The kernel's way: a readahead request, then (before it ends) the read of the same page.
        started = clock.monotonic()
        readahead = TimedRead(reader, big, clock)
        readahead.start()
        clock.wait_for_blocked(1)
        hung.server.wait_for_requests(1)
        clock.advance(0.5)
        page_read = TimedRead(reader, big, clock)
        page_read.start()
        clock.wait_for_blocked(2)  # joined the readahead's attempt
        clock.advance(FETCH_TIMEOUT - 0.5)  # that attempt's deadline
        ra_result, ra_took = readahead.result()
        page, _ = page_read.result()
        page_done = page_read.ended_at - started
        assert isinstance(ra_result, SpanReadError), ra_result
        assert isinstance(page, SpanReadError), page
        assert ra_took <= FETCH_TIMEOUT + SLACK
        assert page_done <= FETCH_TIMEOUT + SLACK, (
            f"the second request of one read ended {page_done:.1f} s after the first began"
        )
        # Asked again at once (the kernel re-requesting the page that just failed): no second
        # timeout, and no second request to the hung registry; it gives the stuck request a
        # grace period to answer.
        again_read = TimedRead(reader, big, clock)
        again_read.start()
        clock.wait_for_blocked(1)
        clock.advance(LATE_RESULT_GRACE_S)
        again, took = again_read.result()
        assert isinstance(again, SpanReadError) and took < LATE_RESULT_GRACE_S + 0.2, (again, took)
        assert hung.server.request_count() == 1

        # The registry answers new requests again; the first one is still stuck in it.
        hung.answer_new_requests()
        clock.advance(RETRY_AFTER_FAILURE_S)
        recovered, took = _timed_read(reader, big, clock)
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
    clock = ManualClock()
    blob = UrlBlobSource(hung.server.url, timeout=60, digest=index.layer_digest)
    reader = _reader(index, blob, tmp_path, clock, workers=1)
    try:
        first_read = TimedRead(reader, files[0], clock)
        first_read.start()
        clock.wait_for_blocked(1)
        hung.server.wait_for_requests(1)
        clock.advance(FETCH_TIMEOUT)
        first, took = first_read.result()
        assert isinstance(first, SpanReadError) and took <= FETCH_TIMEOUT + SLACK
        # The only worker is stuck in the registry: a read of other spans queues behind it and
        # still fails by its own deadline, without its request ever being sent.
        second_read = TimedRead(reader, files[-1], clock)
        second_read.start()
        clock.wait_for_blocked(1)
        clock.advance(FETCH_TIMEOUT)
        second, took = second_read.result()
        assert isinstance(second, SpanReadError) and took <= FETCH_TIMEOUT + SLACK
        assert hung.server.request_count() == 1
        hung.release()
        clock.advance(RETRY_AFTER_FAILURE_S)
        # The freed worker dropped the fetch its readers had given up on instead of sending it
        # late (that ends its attempt: a fetch error); the next read sends its own.
        give_up = time.monotonic() + 10
        while reader.counters().fetch_errors == 0:
            assert time.monotonic() < give_up, "the queued fetch was never dropped"
            time.sleep(0.01)
        assert hung.server.request_count() == 1
        entry = files[-1]
        assert reader.read(entry, 0, 100) == tar[entry.offset : entry.offset + entry.size][:100]
        assert hung.server.request_count() == 2
    finally:
        reader.close()
        blob.close()
