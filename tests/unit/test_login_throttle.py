"""
Failed logins remembered per client address: growing delays, refusal,
forgetting, and bounded memory.
"""

from twisted.internet.task import Clock

import mailserver.login_throttle as throttling
from mailserver.login_throttle import LoginThrottle, client_key


def test_ipv6_clients_are_blamed_by_their_64_and_mapped_ipv4_as_ipv4():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("not an address") == "not an address"


def test_delays_grow_to_a_cap_then_the_address_is_refused_until_failures_age_out():
    clock = Clock()
    throttle = LoginThrottle(clock, delay=10.0, limit=5, window=600)
    assert [throttle.failed("192.0.2.1") for _ in range(4)] == [10.0, 20.0, 30.0, 30.0]
    assert not throttle.refused("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.refused("192.0.2.1")
    assert not throttle.refused("192.0.2.2")  # others are not blamed
    clock.advance(600)
    assert not throttle.refused("192.0.2.1")
    assert throttle.failed("192.0.2.1") == 10.0  # counting starts over


def test_memory_is_bounded_forgetting_the_longest_quiet_address(monkeypatch):
    monkeypatch.setattr(throttling, "MAX_CLIENTS", 3)
    throttle = LoginThrottle(Clock(), delay=1.0, limit=1, window=600)
    for n in range(4):
        throttle.failed(f"192.0.2.{n}")
    assert not throttle.refused("192.0.2.0")  # forgotten
    assert all(throttle.refused(f"192.0.2.{n}") for n in (1, 2, 3))


def test_failures_counted_here_are_told_and_those_from_elsewhere_count_untold():
    told: list[str] = []
    throttle = LoginThrottle(Clock(), delay=1.0, limit=3, window=600)
    throttle.share_with(told.append)
    throttle.failed("2001:db8:1:2::7")
    assert told == ["2001:db8:1:2::/64"]  # the key, as the others count it
    throttle.record("192.0.2.9")
    throttle.record("192.0.2.9")
    assert not throttle.refused("192.0.2.9")
    assert throttle.failed("192.0.2.9") == 3.0  # the others' two count towards the delay
    assert throttle.refused("192.0.2.9")
    assert told == ["2001:db8:1:2::/64", "192.0.2.9"]  # no echo of what was recorded
