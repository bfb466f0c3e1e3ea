"""
MX routing when DNS misbehaves, against a real twisted.names server on
127.0.0.1 (L{tests.dns_zone}) and the resolver the relay really uses: time-outs,
SERVFAIL, REFUSED, nothing listening and TCP resets are temporary (4.4.3)
and bounded in time; NXDOMAIN is permanent (5.1.2).  Then the runner with
its real courier: the message stays queued with that status and its retry
is scheduled, or it bounces.
"""

from __future__ import annotations

import email
import email.policy
import functools
import socket
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial import unittest

from mailserver.config import Config, HostPort, Relay
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.maildir import Mailbox
from mailserver.relay import QueueStore, RelayRunner
from mailserver.relay.mx import MXRouter, RoutingError
from mailserver.relay.resolver import RELAY_DNS_CACHE, make_resolver
from mailserver.testing import InlineCommitter
from tests.dns_zone import listen

ZONE = {
    "remote.test": {"MX": [[10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.1"]},
    "servfail.test": {"RCODE": "SERVFAIL"},
    "refused.test": {"RCODE": "REFUSED"},
    "silent.test": {"SILENT": True},
    "big.test": {"TRUNCATE": True, "MX": [[10, "mx1.remote.test"]]},
    "reset.test": {"TRUNCATE": True, "TCP": "reset"},
    "slowmx.test": {"MX": [[10, "slow.slowmx.test"]]},
    "slow.slowmx.test": {"SILENT": True},
    "soa.test": {"MX": [[10, "mx1.soa.test"]], "SOA": 60},
    "mx1.soa.test": {"A": ["127.0.0.1"]},
}

DNS_TIMEOUT = 0.4


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouteTests(unittest.TestCase):
    def serve(self, tcp: bool = True) -> str:
        port, listening = listen(reactor, ZONE, tcp=tcp)
        for p in listening:
            self.addCleanup(p.stopListening)
        return HostPort("127.0.0.1", port)

    def router(self, server: HostPort, timeout: float = DNS_TIMEOUT) -> MXRouter:
        resolver = make_resolver(server, reactor, timeout=timeout)
        self.addCleanup(self.disconnect, resolver)
        return MXRouter(resolver, port=2525, clock=reactor, deadline=3 * timeout)

    @staticmethod
    def disconnect(resolver):
        """
        The resolver keeps its TCP connection open; close it for trial.
        """
        for protocol in list(resolver.connections):
            protocol.transport.abortConnection()
        return task.deferLater(reactor, 0.01, lambda: None)

    async def failure(self, router: MXRouter, domain: str) -> tuple[RoutingError, float]:
        started = time.monotonic()
        try:
            hops = await router.route(domain)
        except RoutingError as e:
            return e, time.monotonic() - started
        self.fail(f"{domain} routed to {hops}")

    def assertTemporary(self, e: RoutingError, *words: str) -> None:
        self.assertEqual(e.reply.code, 451)
        self.assertEqual(e.reply.status, "4.4.3")
        for word in words:
            self.assertIn(word, e.reply.text)

    @inline
    async def test_servfail_is_a_directory_server_failure(self):
        e, _ = await self.failure(self.router(self.serve()), "servfail.test")
        self.assertTemporary(e, "MX lookup for servfail.test", "Directory server failure",
                             "SERVFAIL")

    @inline
    async def test_refused_is_temporary(self):
        e, _ = await self.failure(self.router(self.serve()), "refused.test")
        self.assertTemporary(e, "Directory server failure", "REFUSED")

    @inline
    async def test_server_that_never_answers_times_out_in_time(self):
        e, took = await self.failure(self.router(self.serve()), "silent.test")
        self.assertTemporary(e, "DNS lookup timed out")
        self.assertGreaterEqual(took, DNS_TIMEOUT * 0.9)
        self.assertLess(took, 3 * DNS_TIMEOUT + 1)

    @inline
    async def test_nothing_listening_is_a_time_out(self):
        # Nothing on the port: the ICMP "port unreachable" is not reported
        # to twisted.names' unconnected UDP socket, so it must time out.
        e, took = await self.failure(self.router(HostPort("127.0.0.1", free_udp_port())),
                                     "remote.test")
        self.assertTemporary(e, "timed out")
        self.assertLess(took, 3 * DNS_TIMEOUT + 1)

    @inline
    async def test_nxdomain_is_permanent(self):
        e, _ = await self.failure(self.router(self.serve()), "nowhere.test")
        self.assertEqual((e.reply.code, e.reply.status), (550, "5.1.2"))
        self.assertTrue(e.reply.permanent)

    @inline
    async def test_truncated_answer_is_asked_again_over_tcp(self):
        hops = await self.router(self.serve()).route("big.test")
        self.assertEqual([(h.name, h.addresses) for h in hops],
                         [("mx1.remote.test", ("127.0.0.1",))])

    @inline
    async def test_tcp_reset_is_noticed_at_once(self):
        # twisted.names alone notices it only at its 10 s TCP time-out.
        e, took = await self.failure(self.router(self.serve(), timeout=5.0), "reset.test")
        self.assertTemporary(e, "cannot reach the DNS server")
        self.assertLess(took, 2.0)

    @inline
    async def test_tcp_refused_is_temporary(self):
        e, took = await self.failure(self.router(self.serve(tcp=False), timeout=5.0),
                                     "big.test")
        self.assertTemporary(e, "cannot reach the DNS server")
        self.assertLess(took, 2.0)

    @inline
    async def test_mx_host_address_time_out_is_temporary(self):
        e, took = await self.failure(self.router(self.serve()), "slowmx.test")
        self.assertTemporary(e, "slow.slowmx.test", "timed out")
        self.assertLess(took, 3 * DNS_TIMEOUT + 1)

    @inline
    async def test_the_relays_resolver_asks_each_question_once_in_its_ttl(self):
        """
        Issue 22: routing the same domain again asks the server nothing,
        "no AAAA" and "no such name" included, as their answers carry the
        zone's SOA (RFC 2308).
        """
        port, listening = listen(reactor, ZONE)
        for p in listening:
            self.addCleanup(p.stopListening)
        factory = listening[0].factory
        asked = []
        handle = factory.handleQuery

        def counted(message, protocol, address):
            asked.append((message.queries[0].name.name, message.queries[0].type))
            return handle(message, protocol, address)

        factory.handleQuery = counted
        resolver = make_resolver(HostPort("127.0.0.1", port), reactor, timeout=2.0,
                                 cache=RELAY_DNS_CACHE)
        self.addCleanup(self.disconnect, resolver)
        router = MXRouter(resolver, port=2525, clock=reactor, deadline=6.0)
        for _ in range(3):
            hops = await router.route("soa.test")
            self.assertEqual([(h.name, h.addresses) for h in hops],
                             [("mx1.soa.test", ("127.0.0.1",))])
            with self.assertRaises(DNSNameError):
                await resolver.lookupText("_mta-sts.soa.test")
        self.assertEqual(sorted(asked), sorted([
            (b"soa.test", dns.MX), (b"mx1.soa.test", dns.A), (b"mx1.soa.test", dns.AAAA),
            (b"_mta-sts.soa.test", dns.TXT)]))


class RunnerTests(unittest.TestCase):
    """
    The runner with its default courier (MX routing, SMTP client) and the
    loopback DNS server: what a DNS fault leaves in the queue.
    """

    def setUp(self):
        port, listening = listen(reactor, ZONE)
        for p in listening:
            self.addCleanup(p.stopListening)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.config = Config(
            hostname="mx.test", data_dir=folder.name, local_domains=("example.org",),
            relay=Relay(resolver=HostPort("127.0.0.1", port), dns_timeout=DNS_TIMEOUT,
                        retry_schedule=(3600.0,), scan_interval=3600),
        )
        self.accounts = accounts_for(self.config)
        self.accounts.add_user("s@example.org", "pw")
        self.queue = QueueStore(self.config.queue_path)
        self.intake = Intake(accounts=self.accounts, reactor=reactor,
                             data_path=self.config.data_path, hostname=self.config.hostname,
                             min_free_space=0,
                             queue=self.queue, committer=InlineCommitter())
        self.runner = RelayRunner(relay=self.config.relay, hostname=self.config.hostname,
                                  mta_sts_path=self.config.mta_sts_path,
                                  queue=self.queue, intake=self.intake, reactor=reactor,
                                  accounts=self.accounts, jitter=lambda d: d)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)

    async def send(self, to: str) -> None:
        receiver = self.intake.begin(Envelope(
            sender="s@example.org", recipients=(Recipient(address=to, destinations=(to,)),)))
        receiver.write(b"Subject: dns\r\n\r\nbody\r\n")
        await receiver.finish()

    async def until(self, predicate, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not (value := predicate()) and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        return value

    def tried(self) -> list:
        return [m for m in map(self.queue.load, self.queue.ids()) if m.attempts >= 1]

    def bounces(self) -> list:
        box = Mailbox(self.accounts.mailbox_path("s@example.org"), self.config.data_path)
        if not (box.path / "new").exists():
            return []
        out = []
        for info in box.messages():
            with box.open(info) as f:
                out.append(email.message_from_bytes(f.read(), policy=email.policy.default))
        return out

    @inline
    async def test_dns_failures_stay_queued_with_4_4_3_and_a_retry(self):
        await self.send("a@servfail.test")
        await self.send("b@silent.test")
        tried = await self.until(lambda: len(self.tried()) == 2 and self.tried())
        self.assertTrue(tried, "no attempt was recorded")
        by_domain = {m.recipients[0].domain: m for m in tried}
        for domain, words in (("servfail.test", "Directory server failure (SERVFAIL)"),
                              ("silent.test", "DNS lookup timed out")):
            message = by_domain[domain]
            [r] = message.recipients
            self.assertEqual((r.state, r.status), ("pending", "4.4.3"))
            self.assertIn(words, r.diagnostic)
            self.assertEqual(message.attempts, 1)
            self.assertLess(abs(message.next_attempt - r.last_attempt - 3600), 1)
        self.assertEqual(len(self.queue.ids()), 2)
        self.assertEqual(self.bounces(), [])

    @inline
    async def test_nxdomain_bounces_at_once(self):
        await self.send("c@nowhere.test")
        reports = await self.until(self.bounces)
        self.assertEqual(len(reports), 1)
        block = reports[0].get_payload()[1].get_payload()[1]
        self.assertEqual(block["Status"], "5.1.2")
        self.assertEqual(block["Action"], "failed")
        self.assertIn("does not exist", block["Diagnostic-Code"])
        self.assertTrue(await self.until(lambda: self.queue.ids() == []))
