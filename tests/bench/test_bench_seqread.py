"""bench.seqread's pure parts: the summary's medians and ratios, and the rotating order."""

from __future__ import annotations

import pytest

from bench.seqread import OFF, ON, Trial, report, summarize, trial_order


def _trial(trial: int, mode: str, seconds: float, inflate: float) -> Trial:
    return Trial(
        trial=trial,
        mode=mode,
        read_ahead_spans=0 if mode == OFF else 8,
        bytes_read=200_000_000,
        seconds=seconds,
        inflate_mb_s=inflate,
        range_requests=100 if mode == OFF else 40,
        bytes_fetched=80_000_000,
        readahead_spans=0 if mode == OFF else 150,
    )


def test_summary_takes_medians_per_mode_and_ratios_to_each_trials_own_inflate() -> None:
    trials = [
        _trial(1, ON, 1.0, 400.0),  # 200 MB/s, 50 %
        _trial(1, OFF, 2.0, 400.0),  # 100 MB/s
        _trial(2, OFF, 1.6, 250.0),  # 125 MB/s, 50 %
        _trial(2, ON, 0.8, 250.0),  # 250 MB/s, 100 %
        _trial(3, ON, 2.0, 200.0),  # 100 MB/s, 50 %
        _trial(3, OFF, 4.0, 200.0),  # 50 MB/s, 25 %
    ]
    on, off = summarize(trials)
    assert (on.mode, off.mode) == (ON, OFF)
    assert (on.mb_s_median, on.mb_s_min, on.mb_s_max) == (200.0, 100.0, 250.0)
    assert on.ratio_median == pytest.approx(0.5)
    assert off.ratio_median == pytest.approx(0.25)
    assert on.inflate_mb_s_median == 250.0
    assert on.range_requests_median == 40 and off.mb_fetched_median == 80.0
    table = report([on, off])
    assert "| read-ahead on | 3 | 200 [100-250] | 250 | 50% | 40 | 80.0 |" in table


def test_the_order_of_configurations_rotates_between_trials() -> None:
    modes = [OFF, ON]
    assert trial_order(1, modes) == [ON, OFF]
    assert trial_order(2, modes) == [OFF, ON]
