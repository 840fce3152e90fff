"""The refused-request throttle: bounded audit lines per address and minute, the rest counted."""

from __future__ import annotations

from exporter.api.refusals import MAX_ADDRESSES, SHARED, RefusalThrottle, Verdict


def test_each_address_gets_its_limit_of_audited_refusals_per_window() -> None:
    throttle = RefusalThrottle(limit=3, window_seconds=60)
    verdicts = [throttle.admit("10.0.0.1", 100.0 + i) for i in range(5)]
    assert [v.write for v in verdicts] == [True, True, True, False, False]
    # Logged once, at the first refusal left out, not at every one.
    assert [v.first_left_out for v in verdicts] == [False, False, False, True, False]
    # Another address has its own allowance.
    assert throttle.admit("10.0.0.2", 104.0) == Verdict(True, 0, False)


def test_the_next_window_reports_how_many_were_left_out() -> None:
    throttle = RefusalThrottle(limit=2, window_seconds=60)
    for i in range(7):
        throttle.admit("a", 10.0 + i)
    assert throttle.admit("a", 69.9).write is False  # still the first window
    assert throttle.admit("a", 70.0) == Verdict(True, 6, False)
    assert throttle.admit("a", 71.0) == Verdict(True, 0, False)


def test_zero_means_every_refusal_is_audited() -> None:
    throttle = RefusalThrottle(limit=0)
    assert all(throttle.admit("a", float(i)) == Verdict(True, 0, False) for i in range(1000))


def test_memory_stays_bounded_whatever_the_number_of_addresses() -> None:
    throttle = RefusalThrottle(limit=1, window_seconds=60)
    for i in range(MAX_ADDRESSES + 500):
        throttle.admit(f"addr-{i}", 0.0)
    assert len(throttle._windows) <= MAX_ADDRESSES + 1
    assert SHARED in throttle._windows
    # Once their windows have ended, old addresses make room for new ones.
    assert throttle.admit("late", 61.0).write
    assert "late" in throttle._windows


def test_addresses_that_went_over_the_limit_do_not_keep_new_ones_in_the_shared_bucket() -> None:
    throttle = RefusalThrottle(limit=1, window_seconds=60)
    for i in range(MAX_ADDRESSES):
        throttle.admit(f"addr-{i}", 0.0)
        throttle.admit(f"addr-{i}", 0.0)  # one over the limit: counted, not audited
    assert throttle.admit("new", 3600.0).write
    assert "new" in throttle._windows
