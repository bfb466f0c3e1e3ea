"""
MTA-STS over real loopback sockets: the policy fetched with treq from an
HTTPS server whose certificate comes from a CA made here, its host name
looked up in the loopback zone; then deliveries under C{enforce} and
C{testing} to L{tests.tls_peer.SMTPSink} MX hosts.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailserver.config import Relay
from mailserver.relay.delivery import RouteCourier
from mailserver.relay.mta_sts import MTASTS, PolicyCache, PolicyError, PolicyFetcher
from mailserver.relay.mx import MXRouter
from mailserver.relay.queue import QueuedMessage, RecipientState
from mailserver.relay.tls_policy import ClientTLS
from tests.dns_zone import ZoneResolver
from tests.tls_ca import CA
from tests.tls_peer import listen_https, listen_smtp

BODY = b"Subject: sts\n\nunder a policy\n"
MESSAGE = QueuedMessage(id="Q1", sender="s@example.org", arrival=0, size=len(BODY),
                        recipients=(RecipientState("r@remote.test"),))
ZONE = {
    "remote.test": {"MX": [[10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.1"]},
    "_mta-sts.remote.test": {"TXT": ["v=STSv1; id=2026a"]},
    "mta-sts.remote.test": {"A": ["127.0.0.1"]},
}


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


def policy(mode: str, *mx: str) -> bytes:
    return ("version: STSv1\n" f"mode: {mode}\n" + "".join(f"mx: {m}\n" for m in mx)
            + "max_age: 604800\n").encode()


class Store:
    def take_recent_body(self, queue_id):
        return BODY  # as just queued: no file read

    def open_body(self, message):
        return io.BytesIO(BODY)


class MTASTSTests(unittest.TestCase):
    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = Path(folder.name)
        self.ca = CA()
        self.tls = ClientTLS(self.ca.cert_pem)
        self.router = MXRouter(ZoneResolver(ZONE))
        self.served = policy("enforce", "mx1.remote.test")
        self.counted = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.sinks = []

    def https(self, name: str = "mta-sts.remote.test", ca: CA | None = None) -> tuple[int, list]:
        cert, key = (ca or self.ca).issue(name).write(self.folder, f"https-{name}")
        port, requests, listening = listen_https(reactor, cert, key, lambda host: self.served)
        self.addCleanup(listening.stopListening)
        return port, requests

    def fetcher(self, port: int, timeout: float = 5.0) -> PolicyFetcher:
        return PolicyFetcher(reactor, self.router.addresses, self.tls, port=port, timeout=timeout)

    def sink(self, name: str, ca: CA | None = None):
        cert, key = (ca or self.ca).issue(name).write(self.folder, f"smtp-{name}-{len(self.sinks)}")
        port, sink, listening = listen_smtp(reactor, cert, key)
        self.addCleanup(listening.stopListening)
        self.sinks.append(sink)
        return port, sink

    async def deliver(self, smtp_port: int, https_port: int):
        relay = Relay(port=smtp_port, connect_timeout=5, command_timeout=5, data_timeout=5)
        sts = MTASTS(resolver=ZoneResolver(ZONE), fetcher=self.fetcher(https_port),
                     cache=PolicyCache(self.folder / "mta-sts"), clock=reactor)
        courier = RouteCourier(reactor=reactor, relay=relay, hostname="mx.test", store=Store(),
                               router=MXRouter(ZoneResolver(ZONE), port=smtp_port), tls=self.tls,
                               mta_sts=sts, count=lambda **labels: self.counted.append(labels))
        outcomes = await courier.deliver(MESSAGE, MESSAGE.recipients)
        for _ in range(500):  # the client's QUIT
            if all(sink.open == 0 for sink in self.sinks):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0, lambda: None)
        return outcomes["r@remote.test"].reply

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged
                if e.get("event") in ("relay.mta_sts_testing", "relay.mx_not_in_policy")]

    # Fetching.

    @inline
    async def test_fetch_through_the_zone_with_a_verified_certificate(self):
        port, requests = self.https()
        self.assertEqual(await self.fetcher(port).fetch("remote.test"), self.served)
        self.assertEqual(requests, ["mta-sts.remote.test"])

    @inline
    async def test_fetch_refuses_a_certificate_for_another_name_or_from_another_ca(self):
        for name, ca, words in (
                ("www.remote.test", None,
                 "hostname mismatch: the certificate does not name mta-sts.remote.test"),
                ("mta-sts.remote.test", CA("other"),
                 "certificate verify failed: unable to get local issuer certificate")):
            port, requests = self.https(name, ca)
            with self.assertRaises(PolicyError) as caught:
                await self.fetcher(port).fetch("remote.test")
            self.assertEqual(str(caught.exception),
                             f"cannot fetch https://mta-sts.remote.test/.well-known/mta-sts.txt: "
                             f"{words}")
            self.assertEqual(requests, [])

    @inline
    async def test_fetch_refuses_redirects_errors_and_big_policies(self):
        from twisted.web import resource, server, util

        cert, key = self.ca.issue("mta-sts.remote.test").write(self.folder, "https")
        root = resource.Resource()
        known = resource.Resource()
        root.putChild(b".well-known", known)
        known.putChild(b"mta-sts.txt", util.Redirect(b"https://elsewhere.test/policy"))
        from tests.tls_peer import server_options

        listening = reactor.listenSSL(0, server.Site(root), server_options(cert, key),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        with self.assertRaises(PolicyError) as caught:
            await self.fetcher(listening.getHost().port).fetch("remote.test")
        self.assertIn("answered HTTP 302", str(caught.exception))

        port, _ = self.https()
        self.served = b"x" * (64 * 1024 + 1)
        with self.assertRaises(PolicyError) as caught:
            await self.fetcher(port).fetch("remote.test")
        self.assertIn("larger than 65536 bytes", str(caught.exception))
        self.served = None
        with self.assertRaises(PolicyError) as caught:
            await self.fetcher(port).fetch("remote.test")
        self.assertIn("answered HTTP 404", str(caught.exception))

    @inline
    async def test_fetch_of_an_unknown_host_fails_cleanly(self):
        with self.assertRaises(PolicyError) as caught:
            await self.fetcher(443).fetch("nowhere.test")
        self.assertIn("mta-sts.nowhere.test", str(caught.exception))

    # Delivering under a policy.

    @inline
    async def test_enforce_delivers_to_a_verified_mx_in_the_policy(self):
        https_port, _ = self.https()
        port, sink = self.sink("mx1.remote.test")
        reply = await self.deliver(port, https_port)
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual([state for state, line in sink.lines if line.startswith("MAIL")],
                         ["tls"])
        self.assertEqual(self.counted, [dict(domain="remote.test", mode="enforce",
                                             result="success")])
        self.assertTrue((self.folder / "mta-sts" / "remote.test.json").exists())

    @inline
    async def test_enforce_defers_an_mx_outside_the_policy_without_connecting(self):
        self.served = policy("enforce", "mx.elsewhere.test", "*.other.test")
        https_port, _ = self.https()
        port, sink = self.sink("mx1.remote.test")
        reply = await self.deliver(port, https_port)
        self.assertEqual((reply.code, reply.status), (451, "4.7.5"), reply)
        self.assertIn("MTA-STS: mx not in policy: mx1.remote.test", reply.text)
        self.assertEqual(sink.lines, [])
        self.assertEqual(self.counted, [dict(domain="remote.test", mode="enforce",
                                             result="mx-not-in-policy")])

    @inline
    async def test_enforce_defers_an_mx_whose_certificate_fails_and_never_goes_plain(self):
        https_port, _ = self.https()
        for name, ca, words, kind in (
                ("mx9.remote.test", None, "hostname mismatch", "certificate-host-mismatch"),
                ("mx1.remote.test", CA("other"), "certificate verify failed",
                 "certificate-not-trusted")):
            port, sink = self.sink(name, ca)
            sink_lines = sink.lines
            reply = await self.deliver(port, https_port)
            self.assertEqual(reply.status, "4.7.5", reply)
            self.assertTrue(str(reply).startswith("451 4.7.5 MTA-STS: TLS with mx1.remote.test"),
                            reply)
            self.assertIn(words, reply.text)
            self.assertEqual(sink_lines, [("plain", "EHLO mx.test"), ("plain", "STARTTLS")])
            self.assertEqual(self.counted[-1]["result"], kind)

    @inline
    async def test_testing_delivers_and_logs_what_would_have_failed(self):
        self.served = policy("testing", "mx.elsewhere.test")
        https_port, _ = self.https()
        port, sink = self.sink("mx9.remote.test")
        reply = await self.deliver(port, https_port)
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual(len(sink.messages), 1)
        warnings = self.warnings()
        self.assertTrue(any("MTA-STS testing: would have failed domain=remote.test, "
                            "host=mx1.remote.test, reason=mx not in policy" in w
                            for w in warnings), warnings)
        self.assertTrue(any("would have failed" in w and "reason=hostname mismatch" in w
                            for w in warnings), warnings)
        self.assertEqual([c["result"] for c in self.counted],
                         ["mx-not-in-policy", "certificate-host-mismatch"])
        self.assertEqual({c["mode"] for c in self.counted}, {"testing"})

    @inline
    async def test_mode_none_and_no_policy_leave_opportunistic_tls(self):
        self.served = b"version: STSv1\nmode: none\nmax_age: 60\n"
        https_port, _ = self.https()
        port, sink = self.sink("mx9.remote.test", CA("other"))
        reply = await self.deliver(port, https_port)
        self.assertEqual(reply.code, 250, reply)
        self.assertEqual(self.counted, [])
