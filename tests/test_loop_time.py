"""The loop detector with occurrences reported late (issue 13 F2): an event posted to the local
/api/ingest counts at its own time, which may be older than the last one counted. Counting stays
exact: the ``threshold``-th occurrence whose time is inside the window ending now trips it, in
whatever order the occurrences arrive; one older than the window is not counted."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import LoopDetectorConfig
from proxy.guardrails import LoopDetector, RecentKeys


class Reference:
    """The contract, naively: every counted occurrence's time (microseconds), per fingerprint."""

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold, self.window = threshold, round(window * 1_000_000)
        self.times: dict[str, list[int]] = {}

    def observe(self, fingerprint: str, now: float, age: float = 0.0) -> int | None:
        us = int(now * 1_000_000)
        at = us - round(age * 1_000_000)
        if at <= us - self.window:
            return None  # older than the window: not counted
        recent = [t for t in self.times.get(fingerprint, []) if t > us - self.window]
        if len(recent) + 1 >= self.threshold:
            self.times.pop(fingerprint, None)  # a trip starts the count afresh
            return len(recent) + 1
        self.times[fingerprint] = [*recent, at]
        return None


def fp(n: int) -> str:
    return f"sha256:{n:064x}"


def test_occurrences_an_hour_apart_are_not_a_loop() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=4, window_seconds=60))
    now = 10_000.0
    assert [detector.observe(fp(1), now=now, age=3600.0 * k) for k in (3, 2, 1, 0)] == [None] * 4


def test_out_of_order_occurrences_inside_the_window_trip_on_the_threshold_th() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=4, window_seconds=60))
    now = 10_000.0
    assert detector.observe(fp(1), now=now, age=10.0) is None
    assert detector.observe(fp(1), now=now + 1, age=50.0) is None  # older than the first
    assert detector.observe(fp(1), now=now + 2, age=0.0) is None
    trip = detector.observe(fp(1), now=now + 3, age=30.0)
    assert trip is not None and trip.count == 4
    assert trip.reason == f"fingerprint {fp(1)} seen 4 times in 60s"


def test_the_window_ends_now_not_at_the_late_occurrence() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=3, window_seconds=60))
    assert detector.observe(fp(2), now=1000.0) is None
    # 59 s later, an occurrence from 58 s ago, then one from before the first: all three are
    # inside the window that ends now.
    assert detector.observe(fp(2), now=1059.0, age=58.0) is None
    trip = detector.observe(fp(2), now=1059.5, age=59.7)  # t = 999.8
    assert trip is not None and trip.count == 3
    # A window later, times the late occurrences brought in have all left it.
    assert detector.observe(fp(3), now=2000.0) is None
    assert detector.observe(fp(3), now=2061.0, age=1.0) is None  # 2060.0: 60 s after 2000.0
    assert detector.observe(fp(3), now=2062.0, age=61.0) is None  # older than the window


def test_a_late_occurrence_leaves_the_window_at_its_own_time() -> None:
    detector = LoopDetector(LoopDetectorConfig(threshold=3, window_seconds=10))
    assert detector.observe(fp(4), now=100.0) is None  # t = 100
    assert detector.observe(fp(4), now=100.5, age=9.5) is None  # t = 91, counted after t = 100
    # At 101.5, t = 91 has left the window and t = 100 has not: this is the second, not the
    # third; at 100.9 it is the third.
    assert detector.observe(fp(4), now=101.5) is None
    assert detector.observe(fp(5), now=100.0) is None
    assert detector.observe(fp(5), now=100.5, age=9.5) is None
    trip = detector.observe(fp(5), now=100.9)
    assert trip is not None and trip.count == 3


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(2, 5),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    steps=st.lists(
        st.tuples(
            st.integers(0, 400),  # which fingerprint: a few hot ones among many seen once
            st.sampled_from([0.0, 0.001, 0.1, 0.5, 1.0, 2.5, 3.0, 25.0]),  # time since the last
            st.sampled_from([0.0, 0.0, 0.0, 0.000001, 0.3, 0.99, 1.0, 2.4, 2.6, 9.9, 30.0]),  # age
        ),
        max_size=400,
    ),
)
def test_detector_counts_late_occurrences_exactly_like_the_naive_window(
    threshold: int, window: float, steps: list[tuple[int, float, float]]
) -> None:
    detector = LoopDetector(
        LoopDetectorConfig(threshold=threshold, window_seconds=window, max_tracked=1000)
    )
    reference = Reference(threshold, window)
    now = 1000.0
    for which, gap, age in steps:
        now += gap
        fingerprint = fp(which % 7 if which < 200 else which)
        trip = detector.observe(fingerprint, now=now, age=age)
        expected = reference.observe(fingerprint, now, age)
        assert (trip and trip.count) == expected, (fingerprint, now, age)
    assert detector.forgotten == 0


@pytest.mark.parametrize("threshold", [2, 4])
def test_detector_counts_late_occurrences_exactly_over_a_long_run(threshold: int) -> None:
    # Full buckets, generations of repeats rotating, and a third of the occurrences late.
    rng = random.Random(threshold)
    detector = LoopDetector(
        LoopDetectorConfig(threshold=threshold, window_seconds=2.0, max_tracked=1000)
    )
    reference = Reference(threshold, 2.0)
    now, trips, late = 0.0, 0, 0
    for i in range(100_000):
        now += rng.choice((0.0, 0.0005, 0.001, 0.002))
        hot = rng.random() < 0.02
        fingerprint = fp(rng.randrange(50) if hot else i + 1000)
        age = rng.choice((0.0, 0.0, rng.uniform(0, 2.5)))
        late += age > 0
        trip = detector.observe(fingerprint, now=now, age=age)
        expected = reference.observe(fingerprint, now, age)
        assert (trip and trip.count) == expected, (i, fingerprint, now, age)
        trips += expected is not None
    assert trips > 50 and late > 20_000
    assert detector.forgotten == 0


def test_recent_keys_remember_each_key_until_its_own_expiry_and_stay_bounded() -> None:
    recent = RecentKeys(limit=4)
    assert recent.add(1, until=10.0, now=0.0) is True
    assert recent.add(1, until=10.0, now=5.0) is False  # a repeat
    assert recent.add(1, until=20.0, now=10.0) is True  # expired: new again
    for key in (2, 3, 4):
        assert recent.add(key, until=30.0, now=11.0) is True
    assert len(recent) == 4
    # Full, none expired: the oldest half is forgotten to make room.
    assert recent.add(5, until=30.0, now=12.0) is True
    assert len(recent) == 3
    assert recent.add(1, until=30.0, now=12.0) is True  # forgotten
    assert recent.add(4, until=30.0, now=12.0) is False  # kept
    # Full again: the expired ones go first.
    assert recent.add(6, until=40.0, now=35.0) is True
    assert len(recent) == 1
