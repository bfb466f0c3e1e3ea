"""
DNS block- and allowlists, looked up the way Postfix's postscreen does.

A client address is looked up in every configured list at once (its octets,
or for IPv6 its nibbles, reversed in front of the list's domain: RFC 5782
2.1 and 2.4), each answer filtered by the list's reply filter, and the
weights of the lists that name it added up.  A sum of C{threshold} or more
is a listing; a negative sum (allowlists carry negative weights) trusts
the client.  A list that does not answer in time counts as not naming the
client: a blocklist outage must not stop mail.

Verdicts are remembered for L{CACHE_SECONDS} (at most L{CACHE_SIZE}
addresses), as postscreen remembers them, so a client that reconnects
costs no new lookups and the greylisting hook can ask whether the
connection's client was allowlisted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.config.values import DNSBLSite
from mailserver.defences.scope import client_ip
from mailserver.mailauth.dns import DNSTempError, lookup

CACHE_SECONDS = 600.0
CACHE_SIZE = 10_000


def query_name(address: str, domain: str) -> str | None:
    """
    The name to look C{address} up at in the list C{domain}
    (C{2.0.0.127.zen.spamhaus.org}), or C{None} when it is not an IP address.
    """
    ip = client_ip(address)
    if ip is None:
        return None
    reversed_address = ip.reverse_pointer.rsplit(".", 2)[0]  # without in-addr.arpa / ip6.arpa
    return f"{reversed_address}.{domain}"


@dataclass(frozen=True)
class Verdict:
    """
    @ivar score: the sum of the weights of the lists that name the client.
    @ivar listed_by: the blocklists (positive weight) that name it.
    """

    score: int
    listed_by: tuple[str, ...] = ()


class DNSBL:
    """
    @param resolver: a C{twisted.names} resolver (C{relay.resolver}'s).
    @param timeout: seconds every list gets, together.
    """

    log = Logger()

    def __init__(self, sites: tuple[DNSBLSite, ...], threshold: int, resolver, timeout: float,
                 clock) -> None:
        self._sites = sites
        self.threshold = threshold
        self._resolver = resolver
        self._timeout = timeout
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()

    def cached(self, address: str) -> Verdict | None:
        entry = self._cache.get(address)
        if entry is None:
            return None
        expires, verdict = entry
        if expires <= self._clock.seconds():
            del self._cache[address]
            return None
        return verdict

    def allowlisted(self, address: str) -> bool:
        """
        Did the last look-up of C{address} (within L{CACHE_SECONDS}) find
        it trusted?
        """
        verdict = self.cached(address)
        return verdict is not None and verdict.score < 0

    def listed(self, verdict: Verdict) -> bool:
        return verdict.score >= self.threshold

    async def verdict(self, address: str) -> Verdict:
        found = self.cached(address)
        if found is not None:
            self._cache.move_to_end(address)
            return found
        domains = list(dict.fromkeys(site.domain for site in self._sites))  # each asked once
        replies = dict(zip(domains, await defer.gatherResults(
            [defer.ensureDeferred(self._ask(domain, address)) for domain in domains],
            consumeErrors=True,
        )))
        named = [site for site in self._sites if any(map(site.matches, replies[site.domain]))]
        listed_by = tuple(dict.fromkeys(site.domain for site in named if site.weight > 0))
        found = Verdict(sum(site.weight for site in named), listed_by)
        self._cache[address] = (self._clock.seconds() + CACHE_SECONDS, found)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return found

    async def _ask(self, domain: str, address: str) -> list[str]:
        """
        The list's A records for C{address}; none when it does not answer.
        """
        name = query_name(address, domain)
        if name is None:
            return []
        asking = defer.ensureDeferred(lookup(self._resolver, name, "A", self._timeout))
        asking.addTimeout(self._timeout, self._clock)
        try:
            return await asking
        except (DNSTempError, defer.TimeoutError) as e:
            self.log.info("DNSBL {site} did not answer for {address}: {problem}",
                          site=domain, address=address, problem=str(e) or type(e).__name__,
                          event="dnsbl.no_answer", log_system="dnsbl.no_answer#info")
            return []
