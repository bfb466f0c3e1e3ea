"""
The retry schedule: a pure function of the attempt count, with injected jitter.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mailserver.config import Relay
from mailserver.relay.schedule import (
    RetryPolicy,
    next_attempt,
    random_jitter,
    retry_delay,
)


def test_default_schedule_doubles_from_five_minutes_up_to_four_hours():
    policy = RetryPolicy.from_config(Relay())
    delays = [retry_delay(policy, n) / 60 for n in range(1, 10)]
    assert delays == [5, 10, 20, 40, 80, 160, 240, 240, 240]
    assert policy.max_age == 5 * 86400


def test_explicit_schedule_then_doubling():
    policy = RetryPolicy.from_config(
        Relay(retry_schedule=(60.0, 120.0, 900.0), max_retry_interval=3600.0)
    )
    assert [retry_delay(policy, n) for n in range(1, 6)] == [60, 120, 900, 1800, 3600]


def test_jitter_is_injected_and_capped():
    policy = RetryPolicy(delays=(100.0,), cap=150.0)
    assert retry_delay(policy, 1, lambda d: d + 10) == 110.0
    assert retry_delay(policy, 3, lambda d: d * 2) == 150.0


@given(st.integers(min_value=1, max_value=10_000), st.integers(min_value=0))
def test_delay_always_within_bounds(attempts, seed):
    policy = RetryPolicy()
    delay = retry_delay(policy, attempts, random_jitter(random.Random(seed)))
    assert 0 < delay <= policy.cap


def test_next_attempt_stops_at_max_age_with_a_last_try_at_expiry():
    policy = RetryPolicy(delays=(300.0,), cap=3600.0, max_age=1000.0)
    assert next_attempt(policy, arrival=0, now=100, attempts=1) == 400
    assert next_attempt(policy, arrival=0, now=900, attempts=5) == 1000
    assert next_attempt(policy, arrival=0, now=1000, attempts=6) is None
