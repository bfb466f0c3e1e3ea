"""
Outbound connections kept between messages (L{mailserver.relay.connections}):
the courier and the SMTP client against L{tests.tls_peer.SMTPSink} peers on
loopback (STARTTLS with a certificate from a CA made here), MX hosts from
the loopback zone; the cache's idle and age limits on a L{Clock}.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailserver.config import Relay, TLSLevel, TLSPolicyRule
from mailserver.relay.client import ESMTPClient
from mailserver.relay.transaction import OutboundRecipient, Timeouts, Transaction
from mailserver.relay.connections import ConnectionCache, ConnectionKey, KeptConnection, \
    ReuseLimits
from mailserver.relay.delivery import RouteCourier
from mailserver.relay.mx import MXRouter
from mailserver.relay.queue import QueuedMessage, RecipientState
from mailserver.relay.tls_policy import ClientTLS, TLSPolicy
from tests.dns_zone import ZoneResolver
from tests.tls_ca import CA
from tests.tls_peer import listen_smtp

BODY = b"Subject: reuse\n\nagain\n"
ZONE = {"remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "other.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.1"]}}


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


class Store:
    def take_recent_body(self, queue_id):
        return None

    def open_body(self, message):
        return io.BytesIO(BODY)


def message(n: int, recipient: str = "r@remote.test") -> QueuedMessage:
    return QueuedMessage(id=f"Q{n}", sender="s@example.org", arrival=0, size=len(BODY),
                         recipients=(RecipientState(recipient),))


class ReuseTests(unittest.TestCase):
    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = Path(folder.name)
        self.ca = CA()
        self.ca_file = self.ca.write(self.folder / "ca.pem")
        leaf = self.ca.issue("mx1.remote.test")
        cert, key = leaf.write(self.folder, "mx1")
        self.port, self.sink, listening = listen_smtp(reactor, cert, key)
        self.addCleanup(listening.stopListening)
        self.clock = Clock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def courier(self, limits=ReuseLimits(), **relay_keys) -> RouteCourier:
        relay = Relay(ca_file=str(self.ca_file), connect_timeout=5, command_timeout=5,
                      data_timeout=5, port=self.port, **relay_keys)
        self.cache = ConnectionCache(self.clock, limits, per_key=10, total=20)
        self.addCleanup(self.closed)
        with open(self.ca_file, "rb") as f:
            tls = ClientTLS(f.read())
        return RouteCourier(reactor=reactor, relay=relay, hostname="mx.test", store=Store(),
                            router=MXRouter(ZoneResolver(ZONE), port=relay.port), tls=tls,
                            connections=self.cache)

    async def closed(self):
        await self.cache.close()
        await self.settled()

    async def settled(self):
        for _ in range(500):
            if self.sink.open == 0:
                break
            await task.deferLater(reactor, 0.01, lambda: None)

    async def send(self, courier, *messages):
        replies = []
        for m in messages:
            outcomes = await courier.deliver(m, m.recipients)
            replies.append(outcomes[m.recipients[0].address].reply)
        return replies

    def verbs(self) -> list[str]:
        return [line.split()[0].upper() for _, line in self.sink.lines
                if not line.startswith(("Subject", "again")) and line]

    @inline
    async def test_messages_to_one_destination_share_a_connection_with_rset_between(self):
        replies = await self.send(self.courier(), message(1), message(2), message(3))
        self.assertEqual([r.code for r in replies], [250, 250, 250])
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(len(self.sink.messages), 3)
        verbs = [v for v in self.verbs() if v in ("MAIL", "RSET", "EHLO", "QUIT")]
        # Each message ended with the reply to its dot: no RSET before the next.
        self.assertEqual(verbs, ["EHLO", "EHLO", "MAIL", "MAIL", "MAIL"])
        # The later messages went over the TLS the first one started.
        self.assertEqual({state for state, line in self.sink.lines if line.startswith("MAIL")},
                         {"tls"})
        self.assertEqual(len(self.cache), 1)

    @inline
    async def test_a_kept_connection_spares_the_route_lookup(self):
        """
        Issue 22, as Postfix's cache is searched by destination first: while
        a connection to a destination is kept, its next message goes the
        same way with no DNS or MTA-STS lookup; after it closes, the route
        is looked up again.
        """
        courier = self.courier(ReuseLimits(idle=2.0))
        routed = []
        route = courier._router.route
        courier._router.route = lambda domain: (routed.append(domain), route(domain))[1]
        replies = await self.send(courier, message(1), message(2), message(3))
        self.assertEqual([r.code for r in replies], [250, 250, 250])
        self.assertEqual(routed, ["remote.test"])
        await self.send(courier, message(4, "r@other.test"))
        self.assertEqual(routed, ["remote.test", "other.test"])
        self.clock.advance(2.1)  # both idle out
        await self.send(courier, message(5))
        self.assertEqual(routed, ["remote.test", "other.test", "remote.test"])
        self.assertEqual(self.sink.connections, 3)

    @inline
    async def test_a_domain_without_a_route_costs_no_read_of_the_message(self):
        """
        The body is read (in a thread, for its line lengths) only once there
        is somewhere to send it: a domain that does not resolve, retried
        for days, reads nothing.
        """
        courier = self.courier()
        opened = []
        courier._store = type("Counting", (), {
            "take_recent_body": lambda _, queue_id: None,
            "open_body": lambda _, m: opened.append(m.id) or io.BytesIO(BODY)})()
        [reply] = await self.send(courier, message(1, "r@nowhere.test"))
        self.assertEqual(reply.code, 550)
        self.assertEqual(opened, [])
        await self.send(courier, message(2))
        self.assertEqual(opened, ["Q2"])

    @inline
    async def test_a_message_just_queued_is_sent_from_memory_once(self):
        """
        The first attempt of a message the intake just queued takes its
        body from memory (no file read, no thread); any later attempt reads
        the file.
        """
        courier = self.courier()
        opened, recent = [], {"Q1": BODY}
        courier._store = type("Recent", (), {
            "take_recent_body": lambda _, queue_id: recent.pop(queue_id, None),
            "open_body": lambda _, m: opened.append(m.id) or io.BytesIO(BODY)})()
        [reply] = await self.send(courier, message(1))
        self.assertEqual(reply.code, 250)
        self.assertEqual((opened, recent), ([], {}))
        await self.send(courier, message(1))
        self.assertEqual(opened, ["Q1"])
        self.assertEqual(self.sink.messages[-1], self.sink.messages[-2])
        # A body past what is checked on the reactor thread: checked in a
        # thread, and sent from memory all the same, over several chunks
        # whose lines starting with a dot arrive intact.
        large = b"Subject: large\n\n" + b"x" * 70 + b"\n" + b".dot\n" * 30000
        recent["Q2"] = large
        [reply] = await self.send(courier, message(2))
        self.assertEqual((reply.code, opened, recent), (250, ["Q1"], {}))
        received = self.sink.messages[-1][2]
        self.assertTrue(received == large.replace(b"\n", b"\r\n"), received[:200])

    @inline
    async def test_shutdown_closes_kept_connections_with_quit(self):
        await self.send(self.courier(), message(1))
        self.assertEqual(self.sink.open, 1)
        await self.cache.close()
        await self.settled()
        self.assertEqual(self.sink.open, 0)
        self.assertEqual(self.verbs()[-1], "QUIT")
        self.assertEqual(len(self.cache), 0)
        # Nothing is kept after the close: the next connection ends at once.
        await self.send(self.courier(), message(2))
        self.assertEqual(len(self.cache), 1)

    @inline
    async def test_message_limit_per_connection(self):
        courier = self.courier(ReuseLimits(messages=2))
        await self.send(courier, *(message(n) for n in range(5)))
        await self.settled()
        self.assertEqual(self.sink.connections, 3)
        self.assertEqual(len(self.sink.messages), 5)
        self.assertEqual(self.verbs().count("QUIT"), 2)

    @inline
    async def test_idle_limit_closes_with_quit(self):
        courier = self.courier(ReuseLimits(idle=2.0))
        await self.send(courier, message(1))
        self.clock.advance(1.9)
        self.assertEqual(len(self.cache), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.cache), 0)
        await self.settled()
        self.assertEqual(self.sink.open, 0)
        self.assertEqual(self.verbs()[-1], "QUIT")
        await self.send(courier, message(2))
        self.assertEqual(self.sink.connections, 2)

    @inline
    async def test_age_limit(self):
        courier = self.courier(ReuseLimits(idle=60.0, age=10.0))
        await self.send(courier, message(1))
        self.clock.advance(5)
        await self.send(courier, message(2))
        self.assertEqual(self.sink.connections, 1)
        self.clock.advance(5)
        await self.send(courier, message(3))
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(len(self.sink.messages), 3)

    @inline
    async def test_peer_closing_an_idle_connection_takes_it_out(self):
        courier = self.courier()
        await self.send(courier, message(1))
        self.sink.protocols[0].transport.loseConnection()
        await self.settled()
        self.assertEqual(len(self.cache), 0)
        [reply] = await self.send(courier, message(2))
        self.assertEqual(reply.code, 250)
        self.assertEqual((self.sink.connections, len(self.sink.messages)), (2, 2))

    async def first_command_fails(self, mail_reply):
        courier = self.courier()
        await self.send(courier, message(1))
        self.sink.next_mail_reply = mail_reply
        [reply] = await self.send(courier, message(2))
        self.assertEqual(reply.code, 250)
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual([m[1] for m in self.sink.messages], [["r@remote.test"]] * 2)
        [failed] = [e for e in self.events if e.get("event") == "relay.reuse_failed"]
        self.assertEqual(failed["id"], "Q2")

    @inline
    async def test_connection_dropped_at_the_first_command_sends_the_message_on_a_new_one_once(
            self):
        await self.first_command_fails("close")

    @inline
    async def test_421_to_the_first_command_sends_the_message_on_a_new_one_once(self):
        await self.first_command_fails("421 4.4.2 idle too long, closing")

    @inline
    async def test_a_refused_sender_on_a_kept_connection_is_the_message_s_answer(self):
        courier = self.courier()
        await self.send(courier, message(1))
        self.sink.next_mail_reply = "550 5.7.1 not from you"
        [reply] = await self.send(courier, message(2))
        self.assertEqual(reply.code, 550)
        self.assertEqual((self.sink.connections, len(self.sink.messages)), (1, 1))

    @inline
    async def test_no_reuse_across_destinations(self):
        courier = self.courier()
        await self.send(courier, message(1), message(2, "r@other.test"), message(3))
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(len(self.sink.messages), 3)

    @inline
    async def test_no_reuse_across_tls_policies_of_one_mx_host(self):
        # Same MX host and address; other.test requires TLS, remote.test not.
        courier = self.courier(
            tls_policies=(TLSPolicyRule("other.test", TLSLevel.ENCRYPT),))
        await self.send(courier, message(1), message(2, "r@other.test"),
                        message(3, "r@other.test"), message(4))
        self.assertEqual(self.sink.connections, 2)
        self.assertEqual(len(self.sink.messages), 4)


POLICY = TLSPolicy(TLSLevel.MAY, "default")


class FakeClient:
    lost = False
    on_lost = None
    transport = None

    def __init__(self):
        self.quits = 0

    def quit(self):
        self.quits += 1


class CacheTests(unittest.TestCase):
    def key(self, **kw) -> ConnectionKey:
        fields = dict(destination="remote.test", host="mx1.remote.test", address="127.0.0.1",
                      port=25, tls="opportunistic", policy=POLICY, username="")
        fields.update(kw)
        return ConnectionKey(**fields)

    def test_a_connection_is_taken_only_under_an_equal_key(self):
        cache = ConnectionCache(Clock(), ReuseLimits(), per_key=2, total=4)
        client = FakeClient()
        cache.keep(self.key(), KeptConnection(client, None))
        for other in (self.key(policy=TLSPolicy(TLSLevel.VERIFY, "MTA-STS", "remote.test")),
                      self.key(tls="none"), self.key(username="relay@example.org"),
                      self.key(destination="other.test"), self.key(port=587),
                      self.key(address="127.0.0.2")):
            self.assertIsNone(cache.take(other))
        kept = cache.take(self.key())
        self.assertIs(kept.client, client)
        self.assertEqual(kept.messages, 2)
        self.assertIsNone(cache.take(self.key()))

    def test_per_key_and_total_limits(self):
        cache = ConnectionCache(Clock(), ReuseLimits(), per_key=2, total=3)
        clients = [FakeClient() for _ in range(5)]
        for c in clients[:3]:
            cache.keep(self.key(), KeptConnection(c, None))
        self.assertEqual((len(cache), clients[2].quits), (2, 1))
        cache.keep(self.key(port=26), KeptConnection(clients[3], None))
        cache.keep(self.key(port=27), KeptConnection(clients[4], None))
        self.assertEqual((len(cache), clients[4].quits), (3, 1))

    def test_a_lost_connection_leaves_the_cache(self):
        cache = ConnectionCache(Clock(), ReuseLimits(), per_key=2, total=3)
        client = FakeClient()
        cache.keep(self.key(), KeptConnection(client, None))
        client.lost = True
        client.on_lost()
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.take(self.key()))


def transaction(**kw) -> Transaction:
    fields = dict(sender="s@example.org", recipients=(OutboundRecipient("a@remote.test"),),
                  open_body=lambda: io.BytesIO(b"Subject: t\n\nhi\n"), size=16,
                  helo="mx.test", tls="none")
    fields.update(kw)
    return Transaction(**fields)


class ClientReuseTests(unittest.TestCase):
    """
    The client's side of reuse, byte for byte.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = ESMTPClient(transaction(), self.clock, Timeouts(), host="mx",
                                  keep_open=True)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        first = []
        self.client.result.addCallback(first.append)
        self.server("220 hi", "250-mx", "250 PIPELINING", "250 ok", "250 ok", "354 go")
        self.server("250 taken")
        [self.first] = first

    def server(self, *lines: str) -> bytes:
        self.transport.clear()
        for line in lines:
            self.client.dataReceived(line.encode() + b"\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.transport.value()

    def test_a_clean_end_keeps_the_connection_without_quit(self):
        self.assertIs(self.first.connection, self.client)
        self.assertNotIn(b"QUIT", self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def unclean(self, client=None, transport=None) -> None:
        """
        A transaction whose only recipient is refused (kept connection, the
        sender perhaps still held by the server).
        """
        client, transport = client or self.client, transport or self.transport
        results = []
        client.reuse(transaction()).addCallback(results.append)
        for line in ("250 ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients"):
            client.dataReceived(line.encode() + b"\r\n")
        self.assertEqual(results[0].replies["a@remote.test"].code, 550)
        self.assertIs(results[0].connection, client)
        transport.clear()

    def test_after_a_clean_end_the_next_transaction_goes_without_rset(self):
        """
        RFC 5321 4.1.1.4: the reply to the final dot clears the server's
        transaction; the next MAIL leads the pipelined group, and a
        one-chunk body goes in one write with its dot.
        """
        results = []
        self.transport.clear()
        self.client.reuse(transaction()).addCallback(results.append)
        self.assertEqual(self.transport.value(),
                         b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@remote.test>\r\nDATA\r\n")
        self.transport.clear()
        self.client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.transport.value(), b"Subject: t\r\n\r\nhi\r\n.\r\n")
        self.assertIsNone(self.transport.producer)
        self.server("250 again")
        [result] = results
        self.assertEqual(result.replies["a@remote.test"].code, 250)
        self.assertFalse(result.stale)

    def test_after_refused_recipients_rset_leads_the_pipelined_group(self):
        """
        RFC 2920 3.1: RSET may lead the group (one round trip a message).
        """
        self.unclean()
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.assertEqual(self.transport.value(),
                         b"RSET\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@remote.test>\r\n"
                         b"DATA\r\n")
        self.server("250 flushed", "250 ok", "250 ok", "354 go")
        self.server("250 again")
        self.assertEqual(results[0].replies["a@remote.test"].code, 250)
        # That one ended cleanly: no RSET before the next.
        self.transport.clear()
        self.client.reuse(transaction())
        self.assertTrue(self.transport.value().startswith(b"MAIL FROM:"))

    def test_a_refused_pipelined_rset_closes_the_connection_stale(self):
        self.unclean()
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.server("500 5.5.1 what RSET")
        [result] = results
        self.assertTrue(result.stale)
        self.assertEqual(result.replies["a@remote.test"].code, 451)
        self.assertIn("RSET refused", result.replies["a@remote.test"].text)
        self.assertTrue(self.transport.disconnecting)

    def test_without_pipelining_rset_waits_for_its_reply(self):
        client = ESMTPClient(transaction(), self.clock, Timeouts(), host="mx", keep_open=True)
        transport = StringTransport()
        client.makeConnection(transport)
        for line in ("220 hi", "250 mx", "250 ok", "250 ok", "354 go", "250 taken"):
            client.dataReceived(line.encode() + b"\r\n")
        results = []
        transport.clear()
        client.reuse(transaction()).addCallback(results.append)
        self.assertEqual(transport.value(), b"MAIL FROM:<s@example.org>\r\n")  # clean end
        client.dataReceived(b"250 ok\r\n")
        client.dataReceived(b"550 5.1.1 no such user\r\n")
        self.assertEqual(results[0].replies["a@remote.test"].code, 550)
        transport.clear()
        client.reuse(transaction()).addCallback(results.append)
        self.assertEqual(transport.value(), b"RSET\r\n")
        transport.clear()
        client.dataReceived(b"451 4.3.0 not now\r\n")
        result = results[1]
        self.assertTrue(result.stale)
        self.assertEqual(result.replies["a@remote.test"].code, 451)
        self.assertIn(b"QUIT", transport.value())

    def test_lost_before_any_reply_about_the_message_is_stale(self):
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.client.connectionLost(Failure(ConnectionDone("gone")))
        self.assertTrue(results[0].stale)

    def test_lost_after_only_the_rset_reply_is_stale(self):
        self.unclean()
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.server("250 flushed")
        self.client.connectionLost(Failure(ConnectionDone("gone")))
        self.assertTrue(results[0].stale)

    def test_lost_after_the_mail_reply_is_not_stale(self):
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.server("250 ok")
        self.client.connectionLost(Failure(ConnectionDone("gone")))
        self.assertFalse(results[0].stale)
        self.assertEqual(results[0].replies["a@remote.test"].code, 451)

    def test_no_reply_to_the_first_command_times_out_stale(self):
        results = []
        self.client.reuse(transaction()).addCallback(results.append)
        self.clock.advance(Timeouts().command)
        self.assertTrue(results[0].stale)

    def test_421_to_the_final_dot_is_not_kept(self):
        client = ESMTPClient(transaction(), self.clock, Timeouts(), host="mx", keep_open=True)
        transport = StringTransport()
        client.makeConnection(transport)
        results = []
        client.result.addCallback(results.append)
        for line in ("220 hi", "250-mx", "250 PIPELINING", "250 ok", "250 ok", "354 go",
                     "421 4.3.2 going down"):
            client.dataReceived(line.encode() + b"\r\n")
            while transport.producer is not None:
                transport.producer.resumeProducing()
        self.assertIsNone(results[0].connection)
        self.assertIn(b"QUIT", transport.value())


class NoDelayTransport(StringTransport):
    no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def test_the_client_turns_nagle_off():
    # A kept connection's small writes (RSET, the final dot) must not wait
    # for the server's delayed ACK.
    transport = NoDelayTransport()
    ESMTPClient(transaction(), Clock(), Timeouts()).makeConnection(transport)
    assert transport.no_delay
