"""Prefetch scheduler: fetch a startup profile's spans in the background, in order.

One thread works through a list a step (PREFETCH_STEP_BYTES) at a time, with
PREFETCH_IN_FLIGHT steps' requests out at once on threads of their own (one transfers while the
next one's round trip and the last one's inflate happen, which keeps a slow link busy), and
claims a span only when it is about to fetch it, so reads never queue behind the list: they
fetch on the pipeline's regular workers whatever the prefetch has not claimed yet.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from snapshotter.fs.activity import NodeActivity
from snapshotter.fs.reader_counters import SharedCounters
from snapshotter.fs.span_fetch import ClaimedGroup, FetchPipeline
from snapshotter.fs.span_states import Attempt
from snapshotter.index.spans import fetch_range

PREFETCH_STEP_BYTES = 2 << 20  # compressed
PREFETCH_IN_FLIGHT = 2


class Prefetcher:
    def __init__(
        self, pipeline: FetchPipeline, counters: SharedCounters, node_activity: NodeActivity
    ) -> None:
        self.pipeline = pipeline
        self._counters = counters
        self._node_activity = node_activity
        self._closed = False
        self._lock = threading.Lock()
        self._running = 0  # lists not done yet
        self._list_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._fetch_pool = ThreadPoolExecutor(
            max_workers=PREFETCH_IN_FLIGHT, thread_name_prefix="prefetch-fetch"
        )

    def start(self, span_numbers: Iterable[int]) -> None:
        """Queue a list; returns at once. Lists run one after another."""
        with self._lock:
            self._running += 1
        self._list_pool.submit(self._work, list(span_numbers))

    def running(self) -> bool:
        """A list is still queued or fetching (it counts until its last span is in)."""
        with self._lock:
            return self._running > 0

    def close(self) -> None:
        self._closed = True
        self._list_pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _work(self, span_numbers: list[int]) -> None:
        slots = threading.BoundedSemaphore(PREFETCH_IN_FLIGHT)
        in_flight: list[Future[None]] = []
        try:
            position = 0
            while position < len(span_numbers) and not self._closed:
                slots.acquire()  # claim a step only when its requests can go out at once
                step, position = self._step(span_numbers, position)
                claimed: dict[int, Attempt] = {}
                for span_no in step:
                    claim = self.pipeline.claim(span_no)
                    if claim is not None and claim.is_new:
                        claimed[span_no] = claim.attempt
                if not claimed:
                    slots.release()
                    continue
                self._node_activity.note_foreground_fetch()  # other layers wait for it
                try:
                    future = self._fetch_pool.submit(self._fetch, self.pipeline.groups(claimed))
                except RuntimeError:  # closed meanwhile: nobody fetches these any more
                    slots.release()
                    for span_no, attempt in claimed.items():
                        self.pipeline.fail(span_no, attempt, "the layer's reader was closed")
                    return
                future.add_done_callback(lambda _: slots.release())
                in_flight = [f for f in in_flight if not f.done()] + [future]
            futures_wait(in_flight)  # the list counts as running until its last span is in
        finally:
            with self._lock:
                self._running -= 1

    def _fetch(self, groups: list[ClaimedGroup]) -> None:
        """The groups of one step, one after another."""
        for group in groups:
            self.pipeline.fetch_group(group)
        with self._counters.lock:  # counted once done: status shows what it has brought in
            self._counters.values.prefetch_spans += sum(len(group) for group in groups)

    def _step(self, span_numbers: list[int], position: int) -> tuple[list[int], int]:
        """The next spans of the list from position, PREFETCH_STEP_BYTES of them (at least
        one), and where the step after starts."""
        step: list[int] = []
        size = 0
        while position < len(span_numbers) and (not step or size < PREFETCH_STEP_BYTES):
            span_no = span_numbers[position]
            begin, end = fetch_range(self.pipeline.index, span_no)
            step.append(span_no)
            size += end - begin
            position += 1
        return step, position
