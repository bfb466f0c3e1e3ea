"""
The DNS resolver of the relay and the server's other lookups:
C{twisted.names.client.Resolver} with every wait bounded and, for the
relay, answers kept for their time to live.

Every lookup is bounded: the resolver gets explicit per-query timeouts
(twisted.names' own default is 60 seconds a query, and 10 more for its TCP
retry, whatever the configuration says).

The relay asks the same questions for every message to a domain (its MX,
the MX host's A and AAAA, the MTA-STS TXT record), and most of those
answers are negative: a host with no AAAA, a domain with no MTA-STS. So
the relay's resolver keeps negative answers too, as RFC 2308 says a
resolver should: for the TTL of the SOA record in the answer's authority
section, or its MINIMUM field if smaller; an answer without an SOA is not
kept (RFC 2308 5). Without this, each message cost two queries, each on a
new UDP socket.
"""

from __future__ import annotations

import errno
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from mailserver.config import HostPort

# The longest an answer is kept by the relay's resolver, whatever its TTL.
MAX_CACHE_SECONDS = 3600.0
# The longest a negative answer is kept (RFC 2308 7.1 suggests one to three
# hours; a name that gets its first AAAA or MTA-STS record is seen sooner).
MAX_NEGATIVE_SECONDS = 900.0
# How many answers the relay's resolver keeps.
RELAY_DNS_CACHE = 10_000


def query_timeouts(total: float) -> tuple[float, ...]:
    """
    The resolver's retransmission schedule for one query, summing to
    C{total} seconds: twisted.names' own (1, 3, 11) scaled.
    """
    return tuple(total * part / 15 for part in (1, 3, 11))


def negative_ttl(authority) -> int:
    """
    How long a negative answer may be kept (RFC 2308 5): the smaller of the
    SOA record's TTL and its MINIMUM, from the authority section; 0 without
    an SOA.
    """
    ttls = [min(r.ttl, r.payload.minimum) for r in authority
            if r.type == dns.SOA and isinstance(r.payload, dns.Record_SOA)]
    return min(ttls, default=0)


class BoundedResolver(client.Resolver):
    """
    C{twisted.names.client.Resolver} with every wait bounded by C{timeout}.

    Its TCP retry (after a truncated UDP answer) otherwise waits a fixed 10
    seconds and notices a reset connection only at that time-out.

    With C{cache} > 0 it keeps that many answers, the oldest going first:
    those with records for their TTL (at most L{MAX_CACHE_SECONDS}), empty
    answers and "no such name" for their negative TTL (at most
    L{MAX_NEGATIVE_SECONDS}). Other failures (time-outs, SERVFAIL) are
    asked again every time.
    """

    def __init__(self, *, timeout: float, cache: int = 0, **kwargs) -> None:
        self._total = timeout
        self._cache_size = cache
        # key -> (expiry, result tuple or the DNSNameError's message)
        self._cached: OrderedDict[tuple, tuple[float, object]] = OrderedDict()
        super().__init__(timeout=query_timeouts(timeout), **kwargs)

    def _lookup(self, name, cls, type, timeout):
        if not self._cache_size:
            return super()._lookup(name, cls, type, timeout)
        key = (name.lower() if isinstance(name, (bytes, str)) else name, cls, type)
        hit = self._cached.get(key)
        if hit is not None:
            if hit[0] > self._reactor.seconds():
                if isinstance(hit[1], dns.Message):
                    return defer.fail(dns_error.DNSNameError(hit[1]))
                return defer.succeed(hit[1])
            del self._cached[key]
        return super()._lookup(name, cls, type, timeout).addCallbacks(
            self._keep, self._keep_no_such_name, callbackArgs=(key,), errbackArgs=(key,))

    def _keep(self, result, key):
        answers, authority, _ = result
        if answers:
            ttl = min(min(r.ttl for r in answers), MAX_CACHE_SECONDS)
        else:
            ttl = min(negative_ttl(authority), MAX_NEGATIVE_SECONDS)
        self._store(key, ttl, result)
        return result

    def _keep_no_such_name(self, failure: Failure, key):
        if failure.check(dns_error.DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            if isinstance(message, dns.Message):
                self._store(key, min(negative_ttl(message.authority), MAX_NEGATIVE_SECONDS),
                            message)
        return failure

    def _store(self, key, ttl: float, value) -> None:
        if ttl <= 0:
            return
        self._cached[key] = (self._reactor.seconds() + ttl, value)
        self._cached.move_to_end(key)
        while len(self._cached) > self._cache_size:
            self._cached.popitem(last=False)

    def _connectedProtocol(self, interface=""):
        """
        twisted.names' own, with the protocol made quiet first: each query
        gets a new UDP port, and each port would log two lines as it starts
        and two as it stops.
        """
        proto = dns.DNSDatagramProtocol(self, reactor=self._reactor)
        proto.noisy = False
        for _ in range(1000):
            try:
                self._reactor.listenUDP(dns.randomSource(), proto, interface=interface)
            except internet_error.CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE:
                    raise
                continue
            return proto
        raise internet_error.CannotListenError(interface, 0, "no free port for a DNS query")

    def queryTCP(self, queries, timeout=None):
        return super().queryTCP(queries, self._total)

    def stop(self) -> None:
        """
        Stop re-reading C{resolv.conf} every minute, when the relay stops.
        """
        call = getattr(self, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, protocol) -> None:
        super().connectionLost(protocol)
        live = getattr(protocol, "liveMessages", None) or {}
        for query_id, (d, timer) in list(live.items()):
            del live[query_id]
            if timer.active():
                timer.cancel()
            d.errback(internet_error.ConnectionLost("the DNS server closed the connection"))


def make_resolver(server: HostPort | None, reactor, timeout: float = 15.0,
                  cache: int = 0) -> BoundedResolver:
    """
    A C{twisted.names} resolver: C{None} for the system's (from
    C{/etc/resolv.conf}), else the one DNS server C{server} (an IP address
    and port, as C{relay.resolver} gives it); C{timeout} is the most one
    query may take, retransmissions included; C{cache}: answers kept.
    """
    if server is None:
        return BoundedResolver(resolv="/etc/resolv.conf", reactor=reactor, timeout=timeout,
                               cache=cache)
    return BoundedResolver(servers=[(server.host, server.port)], reactor=reactor,
                           timeout=timeout, cache=cache)
