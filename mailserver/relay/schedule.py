"""
When to try again: the retry schedule as pure functions.

No clock and no randomness of its own: the caller passes the attempt count
and a jitter function, so tests pin every delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Jitter = Callable[[float], float]


def no_jitter(delay: float) -> float:
    return delay


def random_jitter(rng: random.Random | None = None, spread: float = 0.1) -> Jitter:
    """
    Spread each delay by up to C{spread} either way, so messages queued
    together during an outage do not all retry in the same second.
    """
    rng = rng or random.Random()

    def jitter(delay: float) -> float:
        return delay * (1 + rng.uniform(-spread, spread))

    return jitter


@dataclass(frozen=True)
class RetryPolicy:
    """
    @ivar delays: the first delays in seconds; after the last, each delay
        doubles the previous one.
    @ivar cap: no delay is longer than this.
    @ivar max_age: past this age (seconds since arrival) a message is no
        longer retried.
    @ivar delay_warning: age after which a delay notice is due, or None.
    """

    delays: tuple[float, ...] = (300.0,)
    cap: float = 4 * 3600.0
    max_age: float = 5 * 86400.0
    delay_warning: float | None = None

    @classmethod
    def from_config(cls, relay) -> RetryPolicy:
        """
        The policy of a L{mailserver.config.Relay} section (durations in
        seconds); an empty C{retry_schedule} is 5 minutes, doubling.
        """
        return cls(
            delays=relay.retry_schedule or (300.0,),
            cap=relay.max_retry_interval,
            max_age=relay.max_age,
            delay_warning=relay.delay_warning,
        )


def retry_delay(policy: RetryPolicy, attempts: int, jitter: Jitter = no_jitter) -> float:
    """
    The delay before the next attempt, after C{attempts} (>= 1) failed ones.

    With the default policy: 5m, 10m, 20m, 40m, 80m, 160m, 4h, 4h, ...
    """
    index = max(attempts, 1) - 1
    if index < len(policy.delays):
        base = policy.delays[index]
    else:
        base = policy.delays[-1] * 2 ** min(index - len(policy.delays) + 1, 64)
    return max(0.0, min(jitter(min(base, policy.cap)), policy.cap))


def next_attempt(
    policy: RetryPolicy, arrival: float, now: float, attempts: int, jitter: Jitter = no_jitter
) -> float | None:
    """
    The time of the next attempt, or None when the message has been retried
    long enough and its pending recipients should bounce.

    The last attempt is pulled in to fall at C{arrival + max_age}, so a
    message is tried one last time when it expires.
    """
    expires = arrival + policy.max_age
    if now >= expires:
        return None
    return min(now + retry_delay(policy, attempts, jitter), expires)
