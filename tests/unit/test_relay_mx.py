"""
MX routing against in-memory twisted.names zones.
"""

from __future__ import annotations

import io
import random

import pytest

from twisted.internet import defer
from twisted.names import error as dns_error

from tests.e2e.relay_fixtures import ZoneResolver
from mailserver.relay.mx import Hop, MXRouter, Ourselves, RoutingError

ZONE = {
    "remote.test": {"MX": [[20, "mx2.remote.test"], [10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.1"]},
    "mx2.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "equal.test": {"MX": [[10, "a.equal.test"], [10, "b.equal.test"], [10, "c.equal.test"]]},
    "a.equal.test": {"A": ["127.0.0.1"]},
    "b.equal.test": {"A": ["127.0.0.1"]},
    "c.equal.test": {"A": ["127.0.0.1"]},
    "implicit.test": {"A": ["127.0.0.1"]},
    "null.test": {"MX": [[0, "."]]},
    "alias.test": {"CNAME": "remote.test"},
    "noaddr.test": {"MX": [[10, "gone.noaddr.test"]]},
    "empty.test": {"AAAA": []},
}


def route(domain, rng=None, resolver=None):
    router = MXRouter(resolver or ZoneResolver(ZONE), port=2525, rng=rng or random.Random(1))
    results = []
    router.route(domain).addBoth(results.append)
    [result] = results
    return result


def test_preference_order():
    hops = route("remote.test")
    assert hops == [Hop("mx1.remote.test", ("127.0.0.1",), 2525),
                    Hop("mx2.remote.test", ("127.0.0.2", "::1"), 2525)]


def test_equal_preferences_are_shuffled():
    orders = {tuple(h.name for h in route("equal.test", random.Random(seed)))
              for seed in range(20)}
    assert len(orders) > 1
    assert all(sorted(o) == ["a.equal.test", "b.equal.test", "c.equal.test"] for o in orders)


def test_implicit_mx_from_the_address_record():
    assert route("implicit.test") == [Hop("implicit.test", ("127.0.0.1",), 2525)]


def test_null_mx_fails_for_good():
    failure = route("null.test")
    assert failure.check(RoutingError)
    assert failure.value.reply.code == 556 and failure.value.reply.status == "5.1.10"


def test_cname_is_followed():
    assert [h.name for h in route("alias.test")] == ["mx1.remote.test", "mx2.remote.test"]


def test_nonexistent_domain_fails_for_good():
    failure = route("nowhere.example")
    assert failure.value.reply.permanent and failure.value.reply.status == "5.1.2"


def test_mx_without_addresses_is_temporary():
    failure = route("noaddr.test")
    assert failure.value.reply.code == 451


def test_lookup_failure_is_temporary():
    class Broken:
        def lookupMailExchange(self, name):
            return defer.fail(dns_error.DNSServerError("SERVFAIL"))

    failure = route("remote.test", resolver=Broken())
    assert failure.check(RoutingError) and failure.value.reply.code == 451


def test_address_literal():
    assert route("[127.0.0.1]") == [Hop("127.0.0.1", ("127.0.0.1",), 2525)]


class OneMessage:
    """
    A queue store whose every message is the same short one.
    """

    def take_recent_body(self, queue_id):
        return None

    def open_body(self, message):
        return io.BytesIO(b"Subject: hi\n\nHello.\n")


def at_once(f, *args):
    return defer.maybeDeferred(f, *args)


def test_first_mx_down_second_takes_it(tmp_path):
    from mailserver.config import Relay
    from mailserver.relay.transaction import TransactionResult, temporary
    from mailserver.wire.reply import Reply
    from mailserver.relay.delivery import RouteCourier
    from mailserver.relay.queue import QueuedMessage, RecipientState

    tried = []

    def send(reactor, address, port, transaction, timeouts, name=""):
        tried.append((name, address, port))
        replies = {r.address: temporary("connection refused") for r in transaction.recipients}
        if address == "127.0.0.2":
            replies = {r.address: Reply.received(250, ("2.0.0 ok",)) for r in transaction.recipients}
            return defer.succeed(TransactionResult(replies, reached=True, host=name))
        return defer.succeed(TransactionResult(replies, reached=False, host=name))

    courier = RouteCourier(reactor=None, relay=Relay(port=2525), hostname="mx.test",
                           store=OneMessage(), router=MXRouter(ZoneResolver(ZONE), port=2525),
                           send=send, io=at_once)
    message = QueuedMessage(id="Q", sender="s@example.org", arrival=0,
                            recipients=(RecipientState("r@remote.test"),))
    results = []
    courier.deliver(message, message.recipients).addBoth(results.append)
    [outcomes] = results
    assert tried == [("mx1.remote.test", "127.0.0.1", 2525), ("mx2.remote.test", "127.0.0.2", 2525)]
    assert outcomes["r@remote.test"].reply.code == 250
    assert outcomes["r@remote.test"].remote_mta == "mx2.remote.test"


def test_smarthost_and_transport_override_mx(tmp_path):
    from mailserver.config import (
        HostPort, Relay, SmarthostTLS, TLSLevel, TLSPolicyRule, Transport,
    )
    from mailserver.relay.transaction import TransactionResult
    from mailserver.wire.reply import Reply
    from mailserver.relay.delivery import RouteCourier
    from mailserver.relay.queue import QueuedMessage, RecipientState

    seen = []

    def send(reactor, address, port, transaction, timeouts, name=""):
        session = transaction.tls_options
        checked = None if session is None else (session.check, session.enforce, session.host)
        seen.append((address, port, transaction.tls, transaction.username, checked))
        replies = {r.address: Reply.received(250, ("ok",)) for r in transaction.recipients}
        return defer.succeed(TransactionResult(replies, reached=True, host=name,
                                               tls="established"))

    message = QueuedMessage(id="Q", sender="s@example.org", arrival=0,
                            recipients=(RecipientState("r@remote.test"),))
    verified = (True, True, "127.0.0.1")
    for relay, expected in (
        (Relay(smarthost=HostPort("127.0.0.1", 587), smarthost_username="u",
               smarthost_password="p"),
         ("127.0.0.1", 587, "required", "u", verified)),
        (Relay(smarthost=HostPort("127.0.0.1", 465), smarthost_tls=SmarthostTLS.IMPLICIT),
         ("127.0.0.1", 465, "implicit", "", verified)),
        (Relay(smarthost=HostPort("127.0.0.1", 465), smarthost_tls=SmarthostTLS.IMPLICIT,
               smarthost_tls_verify=False),
         ("127.0.0.1", 465, "implicit", "", (False, True, "127.0.0.1"))),
        # A transport host is verified like the smarthost ...
        (Relay(transports=(Transport("remote.test", "127.0.0.1", 2626),)),
         ("127.0.0.1", 2626, "required", "", verified)),
        (Relay(port=2727, transports=(Transport("remote.test", "127.0.0.1", None),)),
         ("127.0.0.1", 2727, "required", "", verified)),
        (Relay(transports=(Transport("remote.test", "127.0.0.1", 2626),),
               smarthost_tls_verify=False),
         ("127.0.0.1", 2626, "required", "", (False, True, "127.0.0.1"))),
        # ... unless a policy for its domain says otherwise.
        (Relay(transports=(Transport("remote.test", "127.0.0.1", 2626),),
               tls_policies=(TLSPolicyRule("remote.test", TLSLevel.MAY),)),
         ("127.0.0.1", 2626, "opportunistic", "", (False, True, "127.0.0.1"))),
        (Relay(transports=(Transport("remote.test", "127.0.0.1", 2626),),
               tls_policies=(TLSPolicyRule(".test", TLSLevel.NONE),)),
         ("127.0.0.1", 2626, "none", "", None)),
        # A domain's own route wins over the smarthost (verified, without AUTH).
        (Relay(smarthost=HostPort("127.0.0.1", 587), smarthost_username="u",
               smarthost_password="p", transports=(Transport("remote.test", "10.0.0.5", 25),)),
         ("10.0.0.5", 25, "required", "", (True, True, "10.0.0.5"))),
    ):
        seen.clear()
        courier = RouteCourier(reactor=None, relay=relay, hostname="mx.test",
                               store=OneMessage(), router=MXRouter(ZoneResolver({}), port=25),
                               send=send, io=at_once)
        courier.deliver(message, message.recipients)
        assert seen == [expected], relay
    from mailserver.relay.delivery import destination_of

    both = Relay(smarthost=HostPort("127.0.0.1", 587),
                 transports=(Transport("inside.test", "10.0.0.5", 25),))
    assert destination_of(both, "a@Inside.Test") == "inside.test"
    assert destination_of(both, "a@elsewhere.test") == "smarthost:127.0.0.1:587"


class Hanging:
    """
    A resolver that never answers (and records whether it was told to stop).
    """

    def __init__(self) -> None:
        self.cancelled = []

    def _hang(self, name):
        return defer.Deferred(lambda d: self.cancelled.append(name))

    lookupMailExchange = lookupAddress = lookupIPV6Address = _hang


def test_a_route_has_a_deadline_whatever_the_resolver_does():
    from twisted.internet.task import Clock

    clock = Clock()
    resolver = Hanging()
    router = MXRouter(resolver, clock=clock, deadline=45)
    results = []
    router.route("remote.test").addBoth(results.append)
    clock.advance(44.9)
    assert results == []
    clock.advance(0.1)
    [failure] = results
    assert failure.check(RoutingError)
    assert (failure.value.reply.code, failure.value.reply.status) == (451, "4.4.3")
    assert "DNS lookup for remote.test timed out after 45s" in failure.value.reply.text
    assert resolver.cancelled == ["remote.test"]
    assert clock.getDelayedCalls() == []


def test_an_answer_before_the_deadline_leaves_no_timer():
    from twisted.internet.task import Clock

    clock = Clock()
    router = MXRouter(ZoneResolver(ZONE), port=2525, rng=random.Random(1), clock=clock,
                      deadline=45)
    results = []
    router.route("implicit.test").addBoth(results.append)
    assert results == [[Hop("implicit.test", ("127.0.0.1",), 2525)]]
    assert clock.getDelayedCalls() == []


def test_resolver_timeouts_are_explicit_and_sum_to_the_setting():
    from twisted.internet.task import Clock

    from mailserver.config import HostPort
    from mailserver.relay.resolver import make_resolver, query_timeouts

    assert query_timeouts(15) == (1, 3, 11)
    resolver = make_resolver(HostPort("127.0.0.1", 5353), Clock(), timeout=0.6)
    assert resolver.servers == [("127.0.0.1", 5353)]
    assert abs(sum(resolver.timeout) - 0.6) < 1e-9 and len(resolver.timeout) == 3


def test_mx_hosts_are_looked_up_at_once():
    # Three MX hosts whose lookups never finish: all asked before any answer.
    resolver = Hanging()
    asked = []

    def mx(name):
        from twisted.names import dns

        records = [dns.RRHeader(name.encode(), dns.MX, payload=dns.Record_MX(10, h.encode()))
                   for h in ("a.test", "b.test", "c.test")]
        return defer.succeed((records, [], []))

    def address(name):
        asked.append(name)
        return defer.Deferred()

    resolver.lookupMailExchange = mx
    resolver.lookupAddress = resolver.lookupIPV6Address = address
    MXRouter(resolver, rng=random.Random(1)).route("many.test")
    assert sorted(asked) == ["a.test", "a.test", "b.test", "b.test", "c.test", "c.test"]


def test_the_relays_resolver_keeps_answers_for_their_ttl(monkeypatch):
    """
    Issue 22: the relay asks the same questions for every message to a
    domain; answers with records are kept for their TTL (and a bounded
    number of them), failures and empty answers are asked again.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.names import client, dns
    from twisted.names import error as dns_error

    from mailserver.relay.resolver import BoundedResolver

    asked = []
    replies = {}

    def upstream(self, name, cls, type, timeout):
        asked.append(name)
        reply = replies[name]
        if isinstance(reply, Exception):
            return defer.fail(reply)
        return defer.succeed(reply)

    monkeypatch.setattr(client.Resolver, "_lookup", upstream)
    clock = Clock()
    resolver = BoundedResolver(servers=[("127.0.0.1", 53)], reactor=clock, timeout=5, cache=2)

    def answer(name, ttl):
        record = dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A("127.0.0.2", ttl))
        return [record], [], []

    def ask(name):
        results = []
        resolver.lookupAddress(name).addBoth(results.append)
        return results[0]

    replies.update({b"a.test": answer(b"a.test", 60), b"b.test": answer(b"b.test", 60),
                    b"c.test": answer(b"c.test", 60), b"empty.test": ([], [], []),
                    b"bad.test": dns_error.DNSServerError()})
    assert ask("a.test")[0][0].payload.dottedQuad() == "127.0.0.2"
    assert ask("a.test") == replies[b"a.test"]
    assert asked == [b"a.test"]
    clock.advance(61)
    ask("a.test")
    assert asked == [b"a.test"] * 2
    for name in ("bad.test", "bad.test", "empty.test", "empty.test"):
        ask(name)
    assert asked[2:] == [b"bad.test", b"bad.test", b"empty.test", b"empty.test"]
    # At most two kept: b and c push a out.
    ask("b.test"), ask("c.test"), ask("a.test")
    assert asked[-3:] == [b"b.test", b"c.test", b"a.test"]
    # Without a cache (every other resolver of the server), each is asked.
    plain = BoundedResolver(servers=[("127.0.0.1", 53)], reactor=clock, timeout=5)
    plain.lookupAddress("c.test"), plain.lookupAddress("c.test")
    assert asked[-2:] == [b"c.test", b"c.test"]


def test_the_relays_resolver_keeps_negative_answers_for_the_soa_ttl(monkeypatch):
    """
    RFC 2308: "no such record" and "no such name" are kept for the smaller
    of the SOA's TTL and MINIMUM from the authority section, at most
    MAX_NEGATIVE_SECONDS; without an SOA they are asked again.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.names import client, dns
    from twisted.names import error as dns_error

    from mailserver.relay.resolver import MAX_NEGATIVE_SECONDS, BoundedResolver, negative_ttl

    def soa(ttl, minimum):
        return dns.RRHeader(b"test", dns.SOA, dns.IN, ttl,
                            dns.Record_SOA(b"ns.test", b"root.test", minimum=minimum, ttl=ttl))

    asked = []
    replies = {
        b"nodata.test": ([], [soa(300, 30)], []),
        b"long.test": ([], [soa(86400, 86400)], []),
        b"nosoa.test": ([], [], []),
    }

    def upstream(self, name, cls, type, timeout):
        asked.append(name)
        if name == b"gone.test":
            message = dns.Message(rCode=dns.ENAME)
            message.authority = [soa(20, 600)]
            return defer.fail(dns_error.DNSNameError(message))
        if name == b"gone-nosoa.test":
            return defer.fail(dns_error.DNSNameError(dns.Message(rCode=dns.ENAME)))
        return defer.succeed(replies[name])

    monkeypatch.setattr(client.Resolver, "_lookup", upstream)
    clock = Clock()
    resolver = BoundedResolver(servers=[("127.0.0.1", 53)], reactor=clock, timeout=5, cache=10)

    def ask(name):
        results = []
        resolver.lookupIPV6Address(name).addBoth(results.append)
        return results[0]

    assert negative_ttl([soa(300, 30)]) == 30 and negative_ttl([]) == 0
    assert ask("nodata.test") == ([], [soa(300, 30)], [])
    assert ask("nodata.test")[0] == []
    assert asked == [b"nodata.test"]
    clock.advance(31)
    ask("nodata.test")
    assert asked == [b"nodata.test"] * 2
    # No such name: kept for min(TTL 20, MINIMUM 600), and still an error.
    first, second = ask("gone.test"), ask("gone.test")
    assert first.check(dns_error.DNSNameError) and second.check(dns_error.DNSNameError)
    assert asked.count(b"gone.test") == 1
    clock.advance(21)
    ask("gone.test").trap(dns_error.DNSNameError)
    assert asked.count(b"gone.test") == 2
    # Without an SOA, asked every time.
    for name in ("nosoa.test", "nosoa.test", "gone-nosoa.test", "gone-nosoa.test"):
        result = ask(name)
        if name.startswith("gone"):
            result.trap(dns_error.DNSNameError)
    assert asked.count(b"nosoa.test") == 2 and asked.count(b"gone-nosoa.test") == 2
    # A day's SOA is cut to MAX_NEGATIVE_SECONDS.
    ask("long.test")
    clock.advance(MAX_NEGATIVE_SECONDS - 1)
    ask("long.test")
    assert asked.count(b"long.test") == 1
    clock.advance(2)
    ask("long.test")
    assert asked.count(b"long.test") == 2


def test_the_resolvers_query_ports_log_nothing():
    """
    Each query gets a new UDP port; twisted.names' protocol would log two
    lines as each starts and two as it stops.
    """
    from twisted.internet.task import Clock

    from mailserver.relay.resolver import BoundedResolver

    class Reactor(Clock):
        def __init__(self):
            super().__init__()
            self.listened = []

        def listenUDP(self, port, protocol, interface=""):
            self.listened.append((protocol, protocol.noisy))

    reactor = Reactor()
    resolver = BoundedResolver(servers=[("127.0.0.1", 53)], reactor=reactor, timeout=5)
    proto = resolver._connectedProtocol()
    assert reactor.listened == [(proto, False)]


# A domain whose MX hosts include this server (RFC 5321 5.1).
OURS = {
    "backup.test": {"MX": [[10, "mx1.backup.test"], [20, "mx2.backup.test"],
                           [20, "mx2b.backup.test"], [30, "mx3.backup.test"]]},
    "mx1.backup.test": {"A": ["127.0.0.1"]},
    "mx2.backup.test": {"A": ["127.0.0.2"]},
    "mx2b.backup.test": {"A": ["127.0.0.3"]},
    "mx3.backup.test": {"A": ["127.0.0.4"]},
    "best.test": {"MX": [[10, "mx2.backup.test"], [20, "mx1.backup.test"]]},
    "only.test": {"MX": [[5, "me.test"]]},
    "me.test": {"A": ["192.0.2.1"]},
    "itself.test": {"A": ["127.0.0.2"]},
    "down.test": {"MX": [[10, "gone.down.test"], [20, "mx2.backup.test"]]},
}


def route_as(domain, ourselves):
    router = MXRouter(ZoneResolver(OURS), port=25, rng=random.Random(1), ourselves=ourselves)
    results = []
    router.route(domain).addBoth(results.append)
    [result] = results
    return result


@pytest.mark.parametrize("ourselves", [
    Ourselves(addresses=frozenset({"127.0.0.2"})),
    Ourselves(names=frozenset({"mx2.backup.test"})),
], ids=["by address", "by name"])
def test_a_backup_mx_routes_only_to_better_hosts(ourselves):
    # We are mx2 (preference 20): mx1 stays, mx2b (also 20) and mx3 (30) go.
    assert route_as("backup.test", ourselves) == [Hop("mx1.backup.test", ("127.0.0.1",), 25)]
    # Without knowing ourselves, every host is tried, ourselves too.
    names = [h.name for h in route_as("backup.test", Ourselves())]
    assert names[0] == "mx1.backup.test" and names[3] == "mx3.backup.test"
    assert sorted(names[1:3]) == ["mx2.backup.test", "mx2b.backup.test"]


@pytest.mark.parametrize("domain, ourselves", [
    ("best.test", Ourselves(addresses=frozenset({"127.0.0.2"}))),
    ("only.test", Ourselves(names=frozenset({"me.test"}))),
    ("itself.test", Ourselves(addresses=frozenset({"127.0.0.2"}))),
    ("[127.0.0.2]", Ourselves(addresses=frozenset({"127.0.0.2"}))),
])
def test_mail_for_which_we_are_the_best_mx_loops_and_fails_for_good(domain, ourselves):
    failure = route_as(domain, ourselves)
    assert failure.check(RoutingError), failure
    reply = failure.value.reply
    assert (reply.code, reply.status) == (554, "5.4.6")
    assert str(reply) == f"554 5.4.6 mail for {domain} loops back to myself"


def test_a_better_host_without_an_address_is_a_temporary_failure_not_a_loop():
    failure = route_as("down.test", Ourselves(addresses=frozenset({"127.0.0.2"})))
    assert str(failure.value.reply) == (
        "451 4.4.3 cannot find an address for the MX hosts of down.test: no MX host has an "
        "address")


class RecentBody:
    """
    A queue store holding one just-queued body in memory.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body

    def take_recent_body(self, queue_id):
        body, self.body = self.body, None
        return body

    def open_body(self, message):
        raise AssertionError("a recent body is not read from its file")


def test_a_recent_body_is_checked_on_the_reactor_and_only_refitting_a_large_one_uses_a_thread(
        monkeypatch):
    # The check (bytes.split) holds the GIL in a thread as well; only the
    # Python re-encoding of a large message is worth a thread.
    from mailserver.config import Relay
    from mailserver.relay import line_length
    from mailserver.relay.delivery import RouteCourier
    from mailserver.relay.queue import QueuedMessage, RecipientState

    monkeypatch.setattr(line_length, "IN_MEMORY", 2000)
    jobs = []

    def io(f, *args):
        jobs.append(f)
        return defer.maybeDeferred(f, *args)

    message = QueuedMessage(id="Q", sender="s@example.org", arrival=0,
                            recipients=(RecipientState("r@remote.test"),))
    big = b"Subject: big\n\n" + b"a short line\n" * 500
    long_lines = b"Subject: long\n\n" + b"a" * 1500 + b"\n" + b"x\n" * 500
    small_long = b"Subject: long\n\n" + b"a" * 999 + b"\n"
    for body, threaded in ((big, False), (small_long, False), (long_lines, True)):
        jobs.clear()
        courier = RouteCourier(reactor=None, relay=Relay(port=2525), hostname="mx.test",
                               store=RecentBody(body), router=None, io=io)
        opened = []
        courier._fitted(message).addCallback(opened.append)
        assert opened[0]().read() == line_length.fit(body)
        assert (len(jobs) == 1) is threaded, body[:20]
