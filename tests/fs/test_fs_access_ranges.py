"""What a recording mount logs of the bytes read (access_log.RangeSet): each piece of the tar
stream once, the first time any read covers it, in read order."""

from __future__ import annotations

from snapshotter.fs.access_log import RangeSet


def test_only_bytes_no_earlier_read_covered_are_new() -> None:
    ranges = RangeSet()
    assert ranges.add(10, 20) == [(10, 20)]
    assert ranges.add(0, 5) == [(0, 5)]
    assert ranges.add(3, 30) == [(5, 10), (20, 30)]  # the gaps between what was read
    assert ranges.add(0, 30) == []
    assert ranges.add(40, 50) == [(40, 50)]
    assert ranges.add(30, 40) == [(30, 40)]  # closes the hole: one interval again
    assert ranges.add(7, 7) == []
    assert ranges.add(0, 50) == [] and ranges.add(49, 51) == [(50, 51)]
