"""The per-span state machine of the read path (snapshotter.fs.span_states) on a manual clock:
absent -> in flight -> (cached: out of the table) | failing until T -> absent, and a quick
failure absent at once. The reader tests (test_fs_reader_timeouts) show the same rules
through reads against a hung HTTP server."""

from __future__ import annotations

import pytest

from snapshotter.fs.span_states import (
    LATE_RESULT_GRACE_S,
    RETRY_AFTER_FAILURE_S,
    SpanReadError,
    SpanState,
    SpanTable,
)
from tests.fs.manual_clock import ManualClock

TIMEOUT = 10.0


def _table() -> tuple[SpanTable, ManualClock]:
    clock = ManualClock()
    return SpanTable("sha256:" + "a" * 64, TIMEOUT, clock), clock


def test_a_claimed_span_is_in_flight_and_later_claims_join_it() -> None:
    table, clock = _table()
    assert table.state(3) is SpanState.ABSENT
    first = table.claim(3, None)
    assert first is not None and first.is_new and first.wait_until == clock.monotonic() + TIMEOUT
    assert table.state(3) is SpanState.IN_FLIGHT
    clock.advance(4)
    joined = table.claim(3, None)
    assert joined is not None and not joined.is_new
    assert joined.attempt is first.attempt and joined.wait_until == first.wait_until
    table.succeed(3, first.attempt, b"span bytes")
    assert table.wait(3, joined.attempt, joined.wait_until) == b"span bytes"
    assert table.state(3) is SpanState.ABSENT  # the cache answers for it from now on


def test_an_absent_span_found_in_the_cache_is_not_claimed() -> None:
    table, _ = _table()
    assert table.claim(0, lambda: True) is None
    assert table.state(0) is SpanState.ABSENT


def test_a_timed_out_span_fails_fast_until_the_retry_window_ends() -> None:
    table, clock = _table()
    claim = table.claim(1, None)
    assert claim is not None
    clock.advance(TIMEOUT)  # its deadline: the fetch thread is still stuck in the registry
    assert table.state(1) is SpanState.FAILING
    late = table.claim(1, None)
    assert late is not None and not late.is_new and late.attempt is claim.attempt
    assert late.wait_until == clock.monotonic() + LATE_RESULT_GRACE_S  # a grace for the stuck one
    clock.advance(RETRY_AFTER_FAILURE_S)
    assert table.state(1) is SpanState.ABSENT
    retry = table.claim(1, None)
    assert retry is not None and retry.is_new and retry.attempt is not claim.attempt
    # The stuck fetch answers after all: its bytes serve the new attempt's readers too.
    table.succeed(1, claim.attempt, b"late")
    assert table.wait(1, retry.attempt, retry.wait_until) == b"late"


def test_a_slow_failure_fails_fast_and_a_quick_one_does_not() -> None:
    table, clock = _table()
    slow = table.claim(2, None)
    assert slow is not None
    clock.advance(TIMEOUT * 0.6)
    table.fail(2, slow.attempt, "connection reset")
    assert table.state(2) is SpanState.FAILING
    joined = table.claim(2, None)
    assert joined is not None and joined.wait_until == clock.monotonic()  # fails at once
    with pytest.raises(SpanReadError, match="connection reset"):
        table.wait(2, joined.attempt, joined.wait_until)

    quick = table.claim(5, None)
    assert quick is not None
    table.fail(5, quick.attempt, "connection refused", bad_data=False)
    assert quick.attempt.failed_quickly()
    assert table.state(5) is SpanState.ABSENT
    again = table.claim(5, None)
    assert again is not None and again.is_new


def test_bytes_that_do_not_fit_the_index_are_counted_until_a_fetch_verifies() -> None:
    table, _ = _table()
    for _ in range(2):
        claim = table.claim(7, None)
        assert claim is not None
        table.fail(7, claim.attempt, "digest mismatch", bad_data=True)
    assert table.bad_data_failures(7) == 2
    claim = table.claim(7, None)
    assert claim is not None
    table.succeed(7, claim.attempt, b"ok")
    assert table.bad_data_failures(7) == 0
