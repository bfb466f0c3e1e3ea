"""
Where mail for a domain goes: MX lookup with C{twisted.names}.

RFC 5321 5.1: MX records in preference order (equal preferences shuffled);
no MX record means the domain's own A/AAAA addresses (the implicit MX); a
domain that does not exist fails for good.  RFC 7505: a single MX of C{"."}
(null MX) says the domain takes no mail, which fails for good at once.  A
lookup that times out, gets SERVFAIL or REFUSED, or cannot reach the DNS
server is a temporary failure (4.4.3), retried later.

RFC 5321 5.1: an MX host that is this server (L{Ourselves}: one of its
names, or an address of it) is dropped from the list with every host of the
same preference or worse, so a backup MX hands mail only to better ones and
never to itself; when this server is the best MX (or the implicit one) the
mail would loop, and fails for good as Postfix fails it ("mail for DOMAIN
loops back to myself", 5.4.6).

Every lookup is bounded: the resolver (L{mailserver.relay.resolver}) gets
explicit per-query timeouts, and L{MXRouter} gives up on a whole route
after a deadline, whatever the resolver does.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from mailserver.wire.reply import Reply

_MAX_CNAME = 8


@dataclass(frozen=True)
class Ourselves:
    """
    The names and addresses by which other hosts reach this server.
    """

    names: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, hostname: str, relay) -> Ourselves:
        names = {hostname.lower().rstrip("."), *relay.own_names}
        return cls(frozenset(names), frozenset(relay.own_addresses))

    def is_us(self, name: str, addresses: tuple[str, ...]) -> bool:
        return name in self.names or any(a in self.addresses for a in addresses)


@dataclass(frozen=True)
class Hop:
    """
    One host to try: its DNS name, its addresses (IPv4 first), its port.
    """

    name: str
    addresses: tuple[str, ...]
    port: int = 25


class RoutingError(Exception):
    """
    The domain cannot be routed; C{reply} says why and whether for good.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _describe(e: BaseException) -> str:
    """
    An exception in one line; twisted.names puts bytes in its arguments.
    """
    args = [a.decode("ascii", "replace") if isinstance(a, bytes) else repr(a) for a in e.args
            if not hasattr(a, "answers")]
    return " ".join([type(e).__name__, *args])


def _problem(e: BaseException) -> str:
    """
    What went wrong with a lookup, in words for the queue and the bounce.
    """
    if isinstance(e, defer.TimeoutError):  # twisted.names' DNSQueryTimeoutError too
        return "DNS lookup timed out"
    if isinstance(e, dns_error.DNSServerError):
        return "Directory server failure (SERVFAIL)"
    if isinstance(e, dns_error.DNSQueryRefusedError):
        return "Directory server failure (query REFUSED)"
    if isinstance(e, (dns_error.DNSFormatError, dns_error.DNSNotImplementedError,
                      dns_error.DNSUnknownError)):
        return f"Directory server failure ({type(e).__name__})"
    if isinstance(e, (internet_error.ConnectError, internet_error.ConnectionLost, OSError)):
        return f"cannot reach the DNS server: {_describe(e)}"
    return _describe(e)


def _temporary(text: str) -> RoutingError:
    return RoutingError(Reply(451, "4.4.3", (text,), synthetic=True))


def _permanent(code: int, status: str, text: str) -> RoutingError:
    return RoutingError(Reply(code, status, (text,), synthetic=True))


def _literal(domain: str) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            return str(ipaddress.ip_address(inner))
        except ValueError:
            return None
    return None


class MXRouter:
    """
    Turns a domain into the ordered list of L{Hop}s to try.

    @param resolver: an C{IResolver} (C{twisted.names.client.Resolver}).
    @param rng: shuffles equal preferences; pass a seeded one in tests.
    @param clock: and C{deadline}: a route still unknown after C{deadline}
        seconds is a temporary failure, so a resolver that never answers
        cannot hold a delivery forever (C{None}: no deadline).
    @param ourselves: this server, cut out of every route.
    """

    def __init__(self, resolver, port: int = 25, rng: random.Random | None = None,
                 clock=None, deadline: float | None = None,
                 ourselves: Ourselves = Ourselves()) -> None:
        self._resolver = resolver
        self._port = port
        self._ourselves = ourselves
        self._rng = rng or random.Random()
        self._clock = clock
        self._deadline = deadline if clock is not None else None

    def route(self, domain: str) -> defer.Deferred:
        """
        @return: a Deferred firing with a non-empty list of L{Hop}s, or
            failing with L{RoutingError}.
        """
        domain = domain.lower().rstrip(".")
        d = defer.Deferred.fromCoroutine(self._route(domain))
        if self._deadline is None:
            return d
        result: defer.Deferred = defer.Deferred()

        def expire() -> None:
            result.errback(_temporary(
                f"DNS lookup for {domain} timed out after {self._deadline:g}s"))
            d.cancel()  # stops the lookups that can be stopped

        timer = self._clock.callLater(self._deadline, expire)

        def settled(outcome) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return  # too late: the deadline answered already
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        d.addBoth(settled)
        return result

    def _loop(self, domain: str) -> RoutingError:
        return _permanent(554, "5.4.6", f"mail for {domain} loops back to myself")

    async def _route(self, domain: str) -> list[Hop]:
        literal = _literal(domain)
        if literal is not None:
            if self._ourselves.is_us(literal, (literal,)):
                raise self._loop(domain)
            return [Hop(literal, (literal,), self._port)]
        records = await self._mx_records(domain)
        if records is None:
            # RFC 5321 5.1: no MX, the domain itself is the implicit MX.
            addresses, problem = await self._addresses(domain)
            if not addresses:
                if problem:
                    raise _temporary(f"cannot find an address for {domain}: {problem}")
                raise _permanent(550, "5.1.2", f"{domain} has no mail server (no MX, A or AAAA)")
            if self._ourselves.is_us(domain, addresses):
                raise self._loop(domain)
            return [Hop(domain, addresses, self._port)]
        if any(name in ("", ".") for _, name in records):
            raise _permanent(556, "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for preference, name in records:
            if name not in by_preference.setdefault(preference, []):
                by_preference[preference].append(name)
        ordered = []
        for preference in sorted(by_preference):
            names = by_preference[preference]
            self._rng.shuffle(names)
            ordered.extend((preference, name) for name in names)
        # All hosts at once, so the route takes one lookup's time, not n.
        lookups = [defer.Deferred.fromCoroutine(self._addresses(name)) for _, name in ordered]
        found = [(preference, name, await lookup) for (preference, name), lookup
                 in zip(ordered, lookups)]
        # RFC 5321 5.1: we, and every host no better than us, are out.
        ours = [preference for preference, name, (addresses, _) in found
                if self._ourselves.is_us(name, addresses)]
        if ours:
            found = [entry for entry in found if entry[0] < min(ours)]
            if not found:
                raise self._loop(domain)
        hops = [Hop(name, addresses, self._port) for _, name, (addresses, _) in found if addresses]
        problems = [f"{name}: {problem}" for _, name, (addresses, problem) in found
                    if not addresses and problem]
        if not hops:
            detail = "; ".join(problems) or "no MX host has an address"
            raise _temporary(f"cannot find an address for the MX hosts of {domain}: {detail}")
        return hops

    def addresses(self, name: str) -> defer.Deferred:
        """
        The addresses of a host name, as for an MX host: a Deferred firing
        with C{(addresses, problem)} (see L{_addresses}).
        """
        return defer.Deferred.fromCoroutine(self._addresses(name.lower().rstrip(".")))

    async def _mx_records(self, domain: str) -> list[tuple[int, str]] | None:
        """
        The MX records of C{domain} (following CNAMEs), or None when it has
        none.
        """
        name = domain
        for _ in range(_MAX_CNAME):
            try:
                answers, _, _ = await self._resolver.lookupMailExchange(name)
            except dns_error.DNSNameError:
                raise _permanent(550, "5.1.2", f"domain {domain} does not exist") from None
            except Exception as e:  # timeouts, SERVFAIL, refused: try later
                raise _temporary(f"MX lookup for {domain} failed: {_problem(e)}") from None
            mx = [
                (a.payload.preference, str(a.payload.name).lower().rstrip("."))
                for a in answers
                if a.type == dns.MX
            ]
            if mx:
                return mx
            cnames = {str(a.name).lower().rstrip("."): str(a.payload.name).lower().rstrip(".")
                      for a in answers if a.type == dns.CNAME}
            if name not in cnames:
                return None
            # Follow the chain as far as the answer goes, then ask again.
            seen = {name}
            while name in cnames and cnames[name] not in seen:
                name = cnames[name]
                seen.add(name)
        raise _temporary(f"CNAME chain too long for {domain}")

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], str]:
        """
        C{(addresses, problem)}: IPv4 then IPv6 addresses of C{name}, and a
        description of a temporary lookup failure (empty when the name
        simply has none).
        """
        literal = _literal(f"[{name}]")
        if literal is not None:
            return (literal,), ""
        lookups = [
            (rtype, defer.maybeDeferred(method, name))
            for method, rtype in ((self._resolver.lookupAddress, dns.A),
                                  (self._resolver.lookupIPV6Address, dns.AAAA))
        ]
        found: list[str] = []
        problems = []
        for rtype, lookup in lookups:
            try:
                answers, _, _ = await lookup
            except dns_error.DNSNameError:
                continue
            except Exception as e:
                problems.append(_problem(e))
                continue
            for answer in answers:
                if answer.type == rtype:
                    if rtype == dns.A:
                        address = answer.payload.dottedQuad()
                    else:
                        address = socket.inet_ntop(socket.AF_INET6, answer.payload.address)
                    if address not in found:
                        found.append(address)
        return tuple(found), "; ".join(problems) if not found else ""
