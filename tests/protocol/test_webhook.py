"""
The webhook plugin against a real twisted.web receiver on loopback.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest
from twisted.web import resource, server

from mailserver.hooks import Delivery, PluginContext
from mailserver.plugins.webhook import WebhookPlugin


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self, failures_first: int = 0):
        super().__init__()
        self.received: list[tuple[dict, dict]] = []
        self.failures_first = failures_first

    def render_POST(self, request):
        if self.failures_first:
            self.failures_first -= 1
            request.setResponseCode(503)
            return b"busy"
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((json.loads(request.content.read()), headers))
        return b"ok"


def delivery(n: int) -> Delivery:
    return Delivery(
        queue_id=f"Q{n}", sender="a@x.test", recipient=f"r{n}@localhost", status="delivered", size=100 + n
    )


class WebhookTests(unittest.TestCase):
    def listen(self, receiver: Receiver) -> str:
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hook"

    def build(self, **options):
        context = PluginContext(reactor=reactor, hostname="mx.test", data_path=None)
        hook = WebhookPlugin.build(options, context)
        self.addCleanup(hook._http._agent._pool.closeCachedConnections)
        return hook

    async def drain(self, hook):
        while hook.pending:
            await defer.gatherResults(list(hook.pending))

    @defer.inlineCallbacks
    def test_one_json_post_per_delivery(self):
        receiver = Receiver()
        hook = self.build(url=self.listen(receiver), token="s3cret")
        for n in range(3):
            self.assertIsNone(hook.delivered(delivery(n)))
        yield defer.ensureDeferred(self.drain(hook))
        received = sorted(receiver.received, key=lambda pair: pair[0]["queue_id"])
        self.assertEqual([body["queue_id"] for body, _ in received], ["Q0", "Q1", "Q2"])
        body, headers = received[0]
        self.assertEqual(
            {k: body[k] for k in ("sender", "recipient", "status", "size")},
            {"sender": "a@x.test", "recipient": "r0@localhost", "status": "delivered", "size": 100},
        )
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["Authorization"], "Bearer s3cret")

    @defer.inlineCallbacks
    def test_retries_after_a_failure(self):
        receiver = Receiver(failures_first=2)
        hook = self.build(url=self.listen(receiver), retries=3, retry_delay=0.01)
        hook.delivered(delivery(7))
        yield defer.ensureDeferred(self.drain(hook))
        self.assertEqual([body["queue_id"] for body, _ in receiver.received], ["Q7"])

    @defer.inlineCallbacks
    def test_gives_up_quietly_when_nobody_listens(self):
        """
        Quietly: the delivery hook returns at once and never fails; each
        refused attempt is a warning and giving up one error line, with no
        traceback.
        """
        receiver = Receiver()
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        yield port.stopListening()
        hook = self.build(url=url, retries=1, retry_delay=0.01, timeout=2)
        with capturedLogs() as events:
            self.assertIsNone(hook.delivered(delivery(1)))
            self.assertEqual(len(hook.pending), 1)  # the POST goes on in the background
            yield defer.ensureDeferred(self.drain(hook))
        ours = [e for e in events if e.get("log_namespace", "").startswith("mailserver.plugins.webhook")]
        self.assertEqual([e for e in ours if "log_failure" in e], [])
        warnings = [e for e in ours if e["log_level"] == LogLevel.warn]
        self.assertEqual([(e["id"], e["n"]) for e in warnings], [("Q1", 1), ("Q1", 2)])
        for event in warnings:
            self.assertIn("refused", event["problem"].lower())
        errors = [e for e in ours if e["log_level"] >= LogLevel.error]
        self.assertEqual([(e["log_format"], e["id"]) for e in errors], [("webhook {url} gave up on {id}", "Q1")])
        self.assertEqual(receiver.received, [])
