"""The token bucket and the inbound message-rate policy, synchronously (time is an argument)."""

from __future__ import annotations

import pytest

from agentcast._ratelimit import Admission, InboundLimiter, TokenBucket


def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket.full(rate=10.0, capacity=3.0, now=0.0)
    assert [bucket.take(1.0, 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.available(0.1) == pytest.approx(1.0)
    assert bucket.available(100.0) == 3.0  # never above capacity
    assert not bucket.take(4.0, 100.0)  # more than there is: nothing taken
    assert bucket.available(100.0) == 3.0


def test_charge_goes_into_debt_and_delay_says_how_long_it_lasts() -> None:
    bucket = TokenBucket.full(rate=100.0, capacity=50.0, now=0.0)
    bucket.charge(70.0, 0.0)
    assert bucket.available(0.0) == -20.0
    assert bucket.delay(0.0) == pytest.approx(0.21)  # back to one token
    assert bucket.delay(0.0, want=500.0) == pytest.approx(0.7)  # capped at the capacity
    assert bucket.delay(1.0) == 0.0


def test_time_going_backwards_never_adds_tokens() -> None:
    bucket = TokenBucket.full(rate=1.0, capacity=2.0, now=10.0)
    bucket.charge(2.0, 10.0)
    assert bucket.available(5.0) == 0.0


def test_over_the_rate_frames_are_refused_then_the_strike_after_the_last_closes() -> None:
    limiter = InboundLimiter.create(rate=1.0, burst=2, max_strikes=3, now=0.0)
    verdicts = [limiter.admit(0.0) for _ in range(6)]
    assert verdicts == [Admission.ACCEPT] * 2 + [Admission.REFUSE] * 3 + [Admission.CLOSE]


def test_an_accepted_frame_forgives_the_strikes() -> None:
    limiter = InboundLimiter.create(rate=1.0, burst=1, max_strikes=1, now=0.0)
    assert limiter.admit(0.0) is Admission.ACCEPT
    assert limiter.admit(0.0) is Admission.REFUSE
    assert limiter.admit(1.0) is Admission.ACCEPT  # a second later there is a token again
    assert limiter.strikes == 0
    assert limiter.admit(1.0) is Admission.REFUSE
    assert limiter.admit(1.0) is Admission.CLOSE
