"""
DNS block- and allowlists looked up through the resolver the server really
uses, against a real twisted.names server on 127.0.0.1 (L{tests.dns_zone}):
reply filters and weights, IPv6 nibble names, lists looked up in parallel,
and a list that never answers counting as not listing within the time-out.
"""

from __future__ import annotations

import functools
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailserver.config import HostPort
from mailserver.config.values import dnsbl_site
from mailserver.defences.dnsbl import DNSBL
from mailserver.relay.resolver import make_resolver
from tests.dns_zone import listen

NIBBLES = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
ZONE = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"]},
    "2.0.0.127.weak.test": {"A": ["127.0.0.4"]},
    "3.0.0.127.bl.test": {"A": ["127.0.0.255"]},  # outside bl.test's filter
    "4.0.0.127.wl.test": {"A": ["127.0.9.2"]},
    "4.0.0.127.bl.test": {"A": ["127.0.0.3"]},
    f"{NIBBLES}.bl.test": {"A": ["127.0.0.2"]},
}
ZONE_SILENT = {"2.0.0.127.slow.test": {"SILENT": True}, "2.0.0.127.slow2.test": {"SILENT": True}}
TIMEOUT = 0.5


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


class DNSBLTests(unittest.TestCase):
    def dnsbl(self, *sites: str, threshold: int = 1, timeout: float = TIMEOUT) -> DNSBL:
        port, listening = listen(reactor, {**ZONE, **ZONE_SILENT})
        for p in listening:
            self.addCleanup(p.stopListening)
        resolver = make_resolver(HostPort("127.0.0.1", port), reactor, timeout=timeout)
        self.addCleanup(self.disconnect, resolver)
        return DNSBL(tuple(dnsbl_site(s) for s in sites), threshold, resolver, timeout, reactor)

    @staticmethod
    def disconnect(resolver):
        for protocol in list(resolver.connections):
            protocol.transport.abortConnection()
        return task.deferLater(reactor, 0.01, lambda: None)

    @inline
    async def test_a_listed_address_within_the_filter(self):
        dnsbl = self.dnsbl("bl.test=127.0.0.[2..11]*3", "weak.test=127.0.0.4")
        verdict = await dnsbl.verdict("127.0.0.2")
        self.assertEqual((verdict.score, verdict.listed_by), (4, ("bl.test", "weak.test")))
        self.assertTrue(dnsbl.listed(verdict))

    @inline
    async def test_a_reply_outside_the_filter_and_no_record_are_not_listings(self):
        dnsbl = self.dnsbl("bl.test=127.0.0.[2..11]*3")
        self.assertEqual((await dnsbl.verdict("127.0.0.3")).score, 0)
        self.assertEqual((await dnsbl.verdict("127.0.0.9")).score, 0)

    @inline
    async def test_an_allowlist_outweighs_a_listing(self):
        dnsbl = self.dnsbl("bl.test=127.0.0.[2..11]*2", "wl.test=127.0.[0..255].[1..3]*-5")
        verdict = await dnsbl.verdict("127.0.0.4")
        self.assertEqual(verdict.score, -3)
        self.assertFalse(dnsbl.listed(verdict))
        self.assertTrue(dnsbl.allowlisted("127.0.0.4"))
        self.assertFalse(dnsbl.allowlisted("127.0.0.2"))  # not looked up

    @inline
    async def test_ipv6_addresses_are_looked_up_by_nibbles(self):
        dnsbl = self.dnsbl("bl.test")
        self.assertEqual((await dnsbl.verdict("2001:db8::1")).listed_by, ("bl.test",))

    @inline
    async def test_lists_that_never_answer_list_nobody_in_time(self):
        timeout = 1.5
        dnsbl = self.dnsbl("slow.test", "slow2.test", "bl.test", timeout=timeout)
        started = time.monotonic()
        verdict = await dnsbl.verdict("127.0.0.2")
        took = time.monotonic() - started
        self.assertEqual(verdict.listed_by, ("bl.test",))
        self.assertGreaterEqual(took, timeout * 0.9)
        self.assertLess(took, timeout * 1.8)  # asked together: one time-out, not two
