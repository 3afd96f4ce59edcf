"""callbridge.audio.pacing: absolute deadlines with a bounded lead, on a fake clock (no timed asserts)."""

from __future__ import annotations

import random

import pytest

from callbridge.audio.pacing import Pacer

CHUNK_S = 0.020


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def send_when_due(pacer: Pacer, clock: FakeClock, oversleep_s: float = 0.0) -> float:
    """What the writer task does for one chunk: sleep until due (maybe late), send. Returns send time."""
    delay = pacer.delay_for_next()
    if delay > 0:
        clock.sleep(delay + oversleep_s)
    pacer.sent()
    return clock.now


def test_first_chunks_of_a_turn_go_out_at_once_up_to_the_lead() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=120, clock=clock)
    immediate = 0
    while pacer.delay_for_next() == 0:
        pacer.sent()
        immediate += 1
    assert immediate == 6  # 6 × 20 ms = the 120 ms lead
    assert pacer.queued_ms() == pytest.approx(120)
    assert pacer.delay_for_next() == pytest.approx(CHUNK_S)


def test_no_drift_over_ten_minutes() -> None:
    """30 000 chunks sent on time: chunk n (from 1) leaves at t0 + n × 20 ms − lead, or at once."""
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=100, clock=clock)
    t0 = clock.now
    times = [send_when_due(pacer, clock) for _ in range(30_000)]
    expected = [max(t0, t0 + n * CHUNK_S - 0.100) for n in range(1, 30_001)]
    assert max(abs(a - b) for a, b in zip(times, expected, strict=True)) < 1e-6
    assert times[-1] == pytest.approx(t0 + 600.0 - 0.100, abs=1e-6)
    assert pacer.restarts == 0
    assert pacer.queued_ms() == pytest.approx(100, abs=1e-3)


def test_no_drift_with_a_sloppy_timer() -> None:
    """Every sleep overshoots by 0-5 ms (an event loop's reality); the error does not add up."""
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=100, clock=clock)
    rng = random.Random(7)
    t0 = clock.now
    for _ in range(30_000):
        send_when_due(pacer, clock, oversleep_s=rng.uniform(0, 0.005))
        assert pacer.queued_ms() <= 100 + 1e-6
    # Audio played = 30 000 chunks; the schedule never restarted, so playback is gapless
    # and ends exactly 10 minutes after it began.
    assert pacer.restarts == 0
    assert clock.now + pacer.queued_ms() / 1000 == pytest.approx(t0 + 30_000 * CHUNK_S, abs=1e-6)


def test_late_wakeup_sends_what_is_overdue_but_not_beyond_the_lead() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=100, clock=clock)
    for _ in range(50):
        send_when_due(pacer, clock)
    clock.sleep(0.060)  # woke 60 ms late; 40 ms still queued at Twilio
    burst = 0
    while pacer.delay_for_next() == 0:
        pacer.sent()
        burst += 1
    assert burst == 3  # refill 40 ms → 100 ms, no more
    assert pacer.queued_ms() == pytest.approx(100)
    assert pacer.restarts == 0


def test_no_burst_after_a_stall() -> None:
    """A 2 s stall: the sender must not fire the 100 'owed' chunks, only refill the lead."""
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=100, clock=clock)
    for _ in range(50):
        send_when_due(pacer, clock)
    clock.sleep(2.0)
    assert pacer.queued_ms() == 0
    burst = 0
    while pacer.delay_for_next() == 0:
        pacer.sent()
        burst += 1
    assert burst == 5
    assert pacer.restarts == 1
    # ... and then it goes on at real-time speed from the new start.
    start = clock.now
    times = [send_when_due(pacer, clock) for _ in range(10)]
    assert times[0] == pytest.approx(start + CHUNK_S)
    assert times[-1] - times[0] == pytest.approx(9 * CHUNK_S)


def test_lead_is_never_exceeded() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=160, clock=clock)
    rng = random.Random(3)
    for _ in range(5_000):
        action = rng.random()
        if action < 0.05:
            clock.sleep(rng.uniform(0, 0.5))  # stall or idle gap
        elif action < 0.07:
            pacer.reset()
        send_when_due(pacer, clock, oversleep_s=rng.uniform(0, 0.03))
        assert pacer.queued_ms() <= 160 + 1e-6


def test_idle_gap_between_turns_restarts_without_reset() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=60, clock=clock)
    for _ in range(10):
        send_when_due(pacer, clock)
    clock.sleep(5.0)
    for _ in range(3):
        assert pacer.delay_for_next() == 0
        pacer.sent()
    assert pacer.delay_for_next() > 0


def test_reset_after_clear_restarts_from_now() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=100, clock=clock)
    for _ in range(20):
        send_when_due(pacer, clock)
    assert pacer.delay_for_next() > 0  # 100 ms queued at Twilio
    pacer.reset()  # we sent `clear`: Twilio's queue is empty
    assert pacer.queued_ms() == 0 and pacer.delay_for_next() == 0
    for _ in range(5):
        pacer.sent()
    assert pacer.queued_ms() == pytest.approx(100)
    assert pacer.restarts == 0  # a reset is not an underrun


def test_sending_several_chunks_at_once() -> None:
    clock = FakeClock()
    pacer = Pacer(chunk_ms=20, lead_ms=120, clock=clock)
    assert pacer.delay_for_next(4) == 0
    pacer.sent(4)  # one 80 ms Mimi frame in one message
    assert pacer.delay_for_next(4) == pytest.approx(0.040)
    assert pacer.delay_for_next(2) == 0
    assert pacer.chunks_sent == 4


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        Pacer(chunk_ms=0)
    with pytest.raises(ValueError):
        Pacer(chunk_ms=20, lead_ms=10)
    with pytest.raises(ValueError):
        Pacer().sent(-1)
    assert Pacer().queued_ms() == 0
