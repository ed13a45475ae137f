"""The helpers that keep long-lived numbers out of a released burst's memory (pinning.py)."""

from __future__ import annotations

import pytest

from meshpool.pinning import renewed, since, stamp


def test_instants_are_integer_milliseconds():
    kept = stamp(1234.5678)
    assert kept == 1234567 and type(kept) is int
    assert since(1235.5678, kept) == pytest.approx(1.0, abs=0.002)
    assert since(1234.5678, stamp(1234.5678)) < 0.001


def test_a_renewed_count_is_a_new_object_of_the_same_value():
    count = 10**6 + 1
    fresh = renewed(count)
    assert fresh == count and fresh is not count  # (a copy: allocated where new ints go now)
    assert renewed(7) == 7
