"""
Failed logins remembered per client address: growing delays, refusal,
checks counted while they run, a process's share of the limit, forgetting,
and bounded memory.
"""

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock

import mailserver.login_throttle as throttling
from mailserver.login_throttle import LoginThrottle, client_key, share_of


def fail(throttle: LoginThrottle, address: str) -> float:
    """
    One failed password check from C{address}; the delay before its answer.
    """
    d = throttle.check(address, lambda: defer.fail(UnauthorizedLogin()))
    assert d is not None, "refused"
    d.addErrback(lambda failure: failure.trap(LoginFailed))
    return throttle.delay(address)


def test_ipv6_clients_are_blamed_by_their_64_and_mapped_ipv4_as_ipv4():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("not an address") == "not an address"


def test_delays_grow_to_a_cap_then_the_address_is_refused_until_failures_age_out():
    clock = Clock()
    throttle = LoginThrottle(clock, delay=10.0, limit=5, window=600)
    assert [fail(throttle, "192.0.2.1") for _ in range(4)] == [10.0, 20.0, 30.0, 30.0]
    assert not throttle.refused("192.0.2.1")
    fail(throttle, "192.0.2.1")
    assert throttle.refused("192.0.2.1")
    assert throttle.check("192.0.2.1", lambda: defer.succeed("checked")) is None
    assert not throttle.refused("192.0.2.2")  # others are not blamed
    clock.advance(600)
    assert not throttle.refused("192.0.2.1")
    assert fail(throttle, "192.0.2.1") == 10.0  # counting starts over


def test_a_running_check_counts_against_the_limit_until_it_ends():
    throttle = LoginThrottle(Clock(), delay=1.0, limit=3, window=600)
    running = [defer.Deferred() for _ in range(3)]
    started = [throttle.check("192.0.2.1", lambda d=d: d) for d in running]
    assert None not in started
    # Three checks under way: a fourth waits for none of them to fail.
    assert throttle.check("192.0.2.1", lambda: defer.succeed("x")) is None
    assert throttle.check("192.0.2.2", lambda: defer.succeed("x")) is not None
    results = []
    for d in started:
        d.addBoth(results.append)
    running[0].callback("avatar")  # a success gives its place back
    assert results == ["avatar"] and not throttle.refused("192.0.2.1")
    running[1].errback(RuntimeError("the checker broke"))  # so does an error
    assert not throttle.refused("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0.0  # neither was a failure
    running[2].errback(UnauthorizedLogin())  # a failure keeps it
    assert results[2].check(LoginFailed) and throttle.delay("192.0.2.1") == 1.0
    assert fail(throttle, "192.0.2.1") == 2.0
    assert not throttle.refused("192.0.2.1")
    fail(throttle, "192.0.2.1")
    assert throttle.refused("192.0.2.1")


def test_a_process_checks_no_more_than_its_share_and_counts_the_others_failures():
    throttle = LoginThrottle(Clock(), delay=1.0, limit=5, window=600, share=2)
    first = defer.Deferred()
    assert throttle.check("192.0.2.1", lambda: first) is not None
    fail(throttle, "192.0.2.1")
    # One failed and one running: this process's two are spent.
    assert throttle.refused("192.0.2.1")
    first.callback("avatar")
    assert not throttle.refused("192.0.2.1")
    fail(throttle, "192.0.2.1")
    assert throttle.refused("192.0.2.1")
    # Failures seen elsewhere lengthen the delay and count toward the limit.
    other = LoginThrottle(Clock(), delay=1.0, limit=5, window=600, share=3)
    for _ in range(3):
        other.record("192.0.2.1")
    assert other.delay("192.0.2.1") == 3.0
    fail(other, "192.0.2.1")
    other.record("192.0.2.1")
    assert other.refused("192.0.2.1")


def test_the_shares_add_up_to_the_limit_and_none_is_zero():
    for limit in (1, 2, 3, 20, 21):
        for processes in (1, 2, 3, 8):
            shares = [share_of(limit, processes, index) for index in range(processes)]
            assert min(shares) >= 1
            # A limit below the number of processes: one check each.
            assert sum(shares) == max(limit, processes)
    assert share_of(20, 1, 0) == 20
    assert [share_of(5, 2, index) for index in range(2)] == [3, 2]


def test_memory_is_bounded_forgetting_the_longest_quiet_address(monkeypatch):
    monkeypatch.setattr(throttling, "MAX_CLIENTS", 3)
    throttle = LoginThrottle(Clock(), delay=1.0, limit=1, window=600)
    for n in range(4):
        fail(throttle, f"192.0.2.{n}")
    assert not throttle.refused("192.0.2.0")  # forgotten
    assert all(throttle.refused(f"192.0.2.{n}") for n in (1, 2, 3))


def test_failures_counted_here_are_told_and_those_from_elsewhere_count_untold():
    told: list[str] = []
    throttle = LoginThrottle(Clock(), delay=1.0, limit=3, window=600)
    throttle.share_with(told.append)
    fail(throttle, "2001:db8:1:2::7")
    assert told == ["2001:db8:1:2::/64"]  # the key, as the others count it
    throttle.record("192.0.2.9")
    throttle.record("192.0.2.9")
    assert not throttle.refused("192.0.2.9")
    assert fail(throttle, "192.0.2.9") == 3.0  # the others' two count towards the delay
    assert throttle.refused("192.0.2.9")
    assert told == ["2001:db8:1:2::/64", "192.0.2.9"]  # no echo of what was recorded
