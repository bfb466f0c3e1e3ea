"""
Outbound TLS over real loopback sockets: the courier and the SMTP client
against L{tests.tls_peer.SMTPSink} peers whose certificates come from a CA
made here (trusted through C{relay.ca_file}), from an unknown CA, or name
another host; MX hosts from the loopback zone.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailserver.config import HostPort, Relay, SmarthostTLS, TLSLevel, TLSPolicyRule
from mailserver.relay.delivery import RouteCourier
from mailserver.relay.mx import MXRouter
from mailserver.relay.queue import QueuedMessage, RecipientState
from mailserver.relay.tls_policy import ClientTLS
from tests.dns_zone import ZoneResolver
from tests.tls_ca import CA
from tests.tls_peer import listen_smtp

BODY = b"Subject: tls\n\nover TLS\n"


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


MESSAGE = QueuedMessage(id="Q1", sender="s@example.org", arrival=0, size=len(BODY),
                        recipients=(RecipientState("r@remote.test"),))
ZONE = {"remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.1"]}}


class TLSRelayTests(unittest.TestCase):
    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = Path(folder.name)
        self.ca = CA()
        self.ca_file = self.ca.write(self.folder / "ca.pem")
        self.counted = []
        self.sinks = []

    def peer(self, *names: str, ca: CA | None = None, implicit: bool = False):
        leaf = (ca or self.ca).issue(*names)
        cert, key = leaf.write(self.folder, "-".join(names) + str(id(leaf)))
        port, sink, listening = listen_smtp(reactor, cert, key, implicit=implicit)
        self.addCleanup(listening.stopListening)
        self.sinks.append(sink)
        return port, sink

    def courier(self, **relay_keys) -> RouteCourier:
        relay = Relay(ca_file=str(self.ca_file), connect_timeout=5, command_timeout=5,
                      data_timeout=5, **relay_keys)
        with open(self.ca_file, "rb") as f:
            tls = ClientTLS(f.read())
        return RouteCourier(reactor=reactor, relay=relay, hostname="mx.test", store=Store(),
                            router=MXRouter(ZoneResolver(ZONE), port=relay.port), tls=tls,
                            count=lambda **labels: self.counted.append(labels))

    async def deliver(self, courier):
        outcomes = await courier.deliver(MESSAGE, MESSAGE.recipients)
        # The client says QUIT after the outcome is known: let it finish.
        for _ in range(500):
            if all(sink.open == 0 for sink in self.sinks):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0, lambda: None)
        return outcomes["r@remote.test"].reply

    def smarthost(self, port: int, **keys) -> dict:
        return dict(smarthost=HostPort("127.0.0.1", port),
                    smarthost_username="relay@example.org", smarthost_password="secret", **keys)

    def assert_no_auth(self, sink) -> None:
        self.assertFalse([line for _, line in sink.lines if line.upper().startswith("AUTH")],
                         sink.lines)
        self.assertEqual(sink.messages, [])

    # The smarthost.

    @inline
    async def test_smarthost_with_a_trusted_certificate_gets_auth_over_tls(self):
        port, sink = self.peer("127.0.0.1")
        reply = await self.deliver(self.courier(**self.smarthost(port)))
        self.assertEqual(reply.code, 250, reply)
        self.assertIn(("tls", "AUTH PLAIN " + "AHJlbGF5QGV4YW1wbGUub3JnAHNlY3JldA=="), sink.lines)
        self.assertEqual([state for state, line in sink.lines if line.startswith("MAIL")],
                         ["tls"])
        self.assertEqual(len(sink.messages), 1)

    @inline
    async def test_smarthost_from_an_unknown_ca_gets_no_auth(self):
        port, sink = self.peer("127.0.0.1", ca=CA("somebody else"))
        reply = await self.deliver(self.courier(**self.smarthost(port)))
        self.assertEqual((reply.code, reply.status), (451, "4.7.5"), reply)
        self.assertIn("certificate verify failed: ", reply.text)
        self.assertIn("unable to get local issuer certificate", reply.text)
        self.assert_no_auth(sink)
        self.assertEqual([line for _, line in sink.lines], ["EHLO mx.test", "STARTTLS"])

    @inline
    async def test_smarthost_with_another_name_gets_no_auth(self):
        port, sink = self.peer("smtp.elsewhere.test")
        reply = await self.deliver(self.courier(**self.smarthost(port)))
        self.assertEqual((reply.code, reply.status), (451, "4.7.5"), reply)
        self.assertIn("hostname mismatch", reply.text)
        self.assertIn("127.0.0.1", reply.text)
        self.assert_no_auth(sink)

    @inline
    async def test_implicit_tls_smarthost_is_verified_too(self):
        port, sink = self.peer("127.0.0.1", ca=CA("somebody else"), implicit=True)
        courier = self.courier(**self.smarthost(port, smarthost_tls=SmarthostTLS.IMPLICIT))
        reply = await self.deliver(courier)
        self.assertEqual(reply.status, "4.7.5", reply)
        self.assertIn("certificate verify failed", reply.text)
        self.assertEqual(sink.lines, [])

        port, sink = self.peer("127.0.0.1", implicit=True)
        courier = self.courier(**self.smarthost(port, smarthost_tls=SmarthostTLS.IMPLICIT))
        reply = await self.deliver(courier)
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual({state for state, _ in sink.lines}, {"tls"})

    @inline
    async def test_verification_can_be_turned_off_but_tls_stays(self):
        port, sink = self.peer("smtp.elsewhere.test", ca=CA("somebody else"))
        reply = await self.deliver(self.courier(**self.smarthost(port,
                                                                 smarthost_tls_verify=False)))
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual([state for state, line in sink.lines if line.startswith("AUTH")],
                         ["tls"])

    # MX hosts.

    @inline
    async def test_verify_policy_checks_the_mx_host_name(self):
        port, sink = self.peer("mx1.remote.test")
        policy = TLSPolicyRule("remote.test", TLSLevel.VERIFY)
        courier = self.courier(port=port, tls_policies=(policy,))
        reply = await self.deliver(courier)
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual(self.counted, [dict(domain="remote.test", mode="verify",
                                             result="success")])

        port, sink = self.peer("mx9.remote.test")
        policy = TLSPolicyRule(".test", TLSLevel.VERIFY)
        courier = self.courier(port=port, tls_policies=(policy,))
        reply = await self.deliver(courier)
        self.assertEqual(reply.status, "4.7.5", reply)
        self.assertIn("TLS with mx1.remote.test [127.0.0.1]", reply.text)
        self.assertIn("hostname mismatch: the certificate does not name mx1.remote.test",
                      reply.text)
        self.assertEqual(sink.messages, [])
        self.assertEqual(self.counted[-1], dict(domain=".test", mode="verify",
                                                result="certificate-host-mismatch"))

    @inline
    async def test_opportunistic_tls_takes_any_certificate(self):
        port, sink = self.peer("mx9.remote.test", ca=CA("somebody else"))
        reply = await self.deliver(self.courier(port=port))
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual([state for state, line in sink.lines if line.startswith("MAIL")],
                         ["tls"])
        self.assertEqual(self.counted, [])  # no per-domain policy

    @inline
    async def test_a_failed_handshake_is_retried_in_plaintext_only_at_the_may_level(self):
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        port, sink = self.peer("mx1.remote.test")
        sink.broken_tls = True
        reply = await self.deliver(self.courier(port=port))
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual([line for state, line in sink.lines if state == "plain"][:3],
                         ["EHLO mx.test", "STARTTLS", "EHLO mx.test"])
        self.assertTrue(any(e.get("event") == "relay.tls_fallback" for e in seen))

        port, sink = self.peer("mx1.remote.test")
        sink.broken_tls = True
        policy = TLSPolicyRule("remote.test", TLSLevel.ENCRYPT)
        courier = self.courier(port=port, tls_policies=(policy,))
        reply = await self.deliver(courier)
        self.assertEqual(reply.status, "4.7.5", reply)
        self.assertEqual(sink.messages, [])
        self.assertEqual([line for _, line in sink.lines], ["EHLO mx.test", "STARTTLS"])

    @inline
    async def test_required_tls_towards_a_server_without_starttls(self):
        port, sink = self.peer("mx1.remote.test")
        sink.offer_starttls = False
        policy = TLSPolicyRule("remote.test", TLSLevel.VERIFY)
        courier = self.courier(port=port, tls_policies=(policy,))
        reply = await self.deliver(courier)
        self.assertEqual(reply.status, "4.7.0", reply)
        self.assertIn("does not offer STARTTLS", reply.text)
        self.assertEqual([line for _, line in sink.lines], ["EHLO mx.test", "QUIT"])
        self.assertEqual(self.counted, [dict(domain="remote.test", mode="verify",
                                             result="starttls-not-supported")])
