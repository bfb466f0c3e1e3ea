"""
The admin HTTP API, served by the real Site on loopback and asked with treq.
"""

from __future__ import annotations

import json
import re

import treq
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from mailserver.metrics import Metrics
from mailserver.web import make_admin_site
from mailserver.web.admin import MAX_BODY


class FakeQueue:
    """
    A relay queue view holding messages by id, recording flush requests.
    """

    def __init__(self, *ids: str) -> None:
        self.messages = [{"id": i, "sender": "a@x.test", "recipients": ["b@y.test"]} for i in ids]
        self.flushed: list[str] = []

    def page(self, after, limit):
        ids = [m["id"] for m in self.messages]
        start = ids.index(after) + 1 if after in ids else 0
        chosen = self.messages[start:start + limit]
        more = start + limit < len(self.messages)
        return chosen, len(self.messages), chosen[-1]["id"] if more else None

    def flush(self, queue_id: str) -> bool:
        self.flushed.append(queue_id)
        return any(m["id"] == queue_id for m in self.messages)


SMTP_UP = {"role": "smtp", "address": "127.0.0.1:2525", "listening": True}
POP3_DOWN = {"role": "pop3", "address": "127.0.0.1:2110", "listening": False}


def parse_exposition(text: str) -> dict[str, float]:
    """
    The samples of a Prometheus text page, keyed by C{name{labels}} as written.
    """
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"(\S+?(?:\{.*\})?) (\S+)", line)
            assert match, line
            samples[match.group(1)] = float(match.group(2))
    return samples


class AdminSiteTests(unittest.TestCase):
    def serve(self, *, listeners=(SMTP_UP,), queue=None, token=None) -> None:
        """
        Listen with a fresh admin site on 127.0.0.1, port chosen by the OS.
        """
        self.metrics = Metrics()
        self.logins = self.metrics.counter("pop3_logins_total", "Successful POP3 logins.")
        self.queue = queue if queue is not None else FakeQueue()
        site = make_admin_site(
            metrics=self.metrics,
            listener_states=lambda: list(listeners),
            queue_view=self.queue,
            token=token,
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def call(self, method: str, path: str, **kwargs):
        response = await self.http.request(method, self.base + path, **kwargs)
        body = await response.content()
        return response, body

    @defer.inlineCallbacks
    def test_health_ok_when_every_listener_serves(self):
        self.serve(listeners=[SMTP_UP])
        response, body = yield defer.ensureDeferred(self.call("GET", "/health"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            json.loads(body), {"status": "ok", "listeners": [SMTP_UP]}
        )

    @defer.inlineCallbacks
    def test_health_503_when_a_listener_is_down(self):
        self.serve(listeners=[SMTP_UP, POP3_DOWN])
        response, body = yield defer.ensureDeferred(self.call("GET", "/health"))
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(body), {"status": "unavailable", "listeners": [SMTP_UP, POP3_DOWN]}
        )

    @defer.inlineCallbacks
    def test_metrics_are_scraped_and_counters_go_up(self):
        self.serve()
        response, body = yield defer.ensureDeferred(self.call("GET", "/metrics"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        self.assertEqual(parse_exposition(body.decode())["pop3_logins_total"], 0)
        self.logins.inc()
        self.logins.inc()
        _, body = yield defer.ensureDeferred(self.call("GET", "/metrics"))
        self.assertEqual(parse_exposition(body.decode())["pop3_logins_total"], 2)
        self.assertIn("# TYPE pop3_logins_total counter", body.decode())

    @defer.inlineCallbacks
    def test_head_answers_like_get_without_body(self):
        self.serve()
        response, body = yield defer.ensureDeferred(self.call("HEAD", "/health"))
        self.assertEqual((response.code, body), (200, b""))

    @defer.inlineCallbacks
    def test_queue_lists_messages(self):
        self.serve(queue=FakeQueue("0190A1B2C3D4E5F6A7", "0190A1B2C3D4E5F6A8"))
        response, body = yield defer.ensureDeferred(self.call("GET", "/api/queue"))
        self.assertEqual(response.code, 200)
        self.assertEqual([m["id"] for m in json.loads(body)], ["0190A1B2C3D4E5F6A7", "0190A1B2C3D4E5F6A8"])
        self.assertEqual(response.headers.getRawHeaders(b"x-total-count"), [b"2"])
        self.assertFalse(response.headers.hasHeader(b"link"))

    @defer.inlineCallbacks
    def test_queue_pages_follow_the_link_header(self):
        ids = [f"0190A1B2C3D4E5F6{n:02X}" for n in range(5)]
        self.serve(queue=FakeQueue(*ids))
        seen, path = [], "/api/queue?limit=2"
        while path:
            response, body = yield defer.ensureDeferred(self.call("GET", path))
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"x-total-count"), [b"5"])
            page = [m["id"] for m in json.loads(body)]
            self.assertLessEqual(len(page), 2)
            seen += page
            [link] = response.headers.getRawHeaders(b"link", [None])
            path = link and re.fullmatch(r'<([^>]+)>; rel="next"', link.decode()).group(1)
        self.assertEqual(seen, ids)

    @defer.inlineCallbacks
    def test_queue_page_arguments_are_checked(self):
        self.serve(queue=FakeQueue("0190A1B2C3D4E5F6A7"))
        for query in ("limit=0", "limit=1001", "limit=x", "limit=-1", "after=..%2Fetc"):
            response, body = yield defer.ensureDeferred(self.call("GET", "/api/queue?" + query))
            self.assertEqual(response.code, 400, query)
            self.assertIn("error", json.loads(body))
        response, body = yield defer.ensureDeferred(self.call("GET", "/api/queue?limit=1000"))
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_flush_known_id_is_accepted(self):
        self.serve(queue=FakeQueue("0190A1B2C3D4E5F6A7"))
        response, body = yield defer.ensureDeferred(
            self.call("POST", "/api/queue/0190A1B2C3D4E5F6A7/flush")
        )
        self.assertEqual(response.code, 202)
        self.assertEqual(json.loads(body), {"id": "0190A1B2C3D4E5F6A7", "status": "flush requested"})
        self.assertEqual(self.queue.flushed, ["0190A1B2C3D4E5F6A7"])

    @defer.inlineCallbacks
    def test_flush_unknown_id_is_404(self):
        self.serve(queue=FakeQueue("0190A1B2C3D4E5F6A7"))
        response, body = yield defer.ensureDeferred(self.call("POST", "/api/queue/NOPE/flush"))
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body), {"error": "unknown queue id", "id": "NOPE"})

    @defer.inlineCallbacks
    def test_flush_never_passes_a_path_like_id_to_the_queue(self):
        self.serve(queue=FakeQueue())
        response, _ = yield defer.ensureDeferred(
            self.call("POST", "/api/queue/..%2F..%2Fetc/flush")
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(self.queue.flushed, [])

    @defer.inlineCallbacks
    def test_unknown_paths_are_404(self):
        self.serve()
        for path in ("/", "/nope", "/health/", "/api", "/api/queue/X", "/api/queue/X/flush/more"):
            response, body = yield defer.ensureDeferred(self.call("GET", path))
            self.assertEqual(response.code, 404, path)
            self.assertEqual(json.loads(body), {"error": "not found"})

    @defer.inlineCallbacks
    def test_wrong_method_is_405_with_allow(self):
        self.serve()
        response, _ = yield defer.ensureDeferred(self.call("POST", "/health"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        response, _ = yield defer.ensureDeferred(self.call("GET", "/api/queue/X/flush"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        response, _ = yield defer.ensureDeferred(self.call("DELETE", "/api/queue"))
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_token_required_without_authorization(self):
        self.serve(token="s3cret")
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("POST", "/api/queue/X/flush"), ("GET", "/nope")]:
            response, body = yield defer.ensureDeferred(self.call(method, path))
            self.assertEqual(response.code, 401, path)
            self.assertEqual(
                response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="mailserver"']
            )
            self.assertEqual(json.loads(body), {"error": "unauthorized"})
        self.assertEqual(self.queue.flushed, [])

    @defer.inlineCallbacks
    def test_wrong_token_or_scheme_is_401(self):
        self.serve(token="s3cret")
        response, _ = yield defer.ensureDeferred(
            self.call("GET", "/health", headers={b"Authorization": [b"Bearer s3cre"]})
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(
            response.headers.getRawHeaders(b"www-authenticate"),
            [b'Bearer realm="mailserver", error="invalid_token"'],
        )
        response, _ = yield defer.ensureDeferred(
            self.call("GET", "/health", headers={b"Authorization": [b"Basic s3cret"]})
        )
        self.assertEqual(response.code, 401)

    @defer.inlineCallbacks
    def test_right_token_is_let_in(self):
        self.serve(token="s3cret", queue=FakeQueue("A1"))
        auth = {b"Authorization": [b"bearer s3cret"]}
        response, _ = yield defer.ensureDeferred(self.call("GET", "/health", headers=auth))
        self.assertEqual(response.code, 200)
        response, _ = yield defer.ensureDeferred(self.call("POST", "/api/queue/A1/flush", headers=auth))
        self.assertEqual(response.code, 202)

    @defer.inlineCallbacks
    def test_empty_token_means_no_authentication(self):
        self.serve(token="")
        response, _ = yield defer.ensureDeferred(self.call("GET", "/health"))
        self.assertEqual(response.code, 200)


class RequestBodyTests(unittest.TestCase):
    """
    What the admin site reads of a request body, driven octet by octet over
    a L{StringTransport}: the answer must come before the body is sent.
    """

    def connect(self, token: str | None = "s3cret"):
        self.queue = FakeQueue("A1")
        site = make_admin_site(
            metrics=Metrics(), listener_states=lambda: [SMTP_UP], queue_view=self.queue, token=token
        )
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def post(self, *headers: bytes) -> bytes:
        return b"\r\n".join(
            [b"POST /api/queue/A1/flush HTTP/1.1", b"Host: admin.test", *headers, b"", b""]
        )

    def status(self, transport: StringTransport) -> bytes:
        return transport.value().split(b"\r\n", 1)[0]

    def assertNothingSpooled(self, channel) -> None:
        for request in channel.requests:
            self.assertIsNone(request.content)

    def test_chunked_body_without_token_is_refused_before_it_is_read(self):
        channel, transport = self.connect()
        channel.dataReceived(self.post(b"Transfer-Encoding: chunked", b"Expect: 100-continue"))
        self.assertEqual(self.status(transport), b"HTTP/1.1 401 Unauthorized")
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertIn(b'WWW-Authenticate: Bearer realm="mailserver"', transport.value())
        self.assertTrue(transport.disconnecting)  # no more is read
        self.assertNothingSpooled(channel)
        self.assertEqual(self.queue.flushed, [])

    def test_large_declared_body_without_token_is_refused_before_it_is_read(self):
        channel, transport = self.connect()
        channel.dataReceived(self.post(b"Content-Length: 400000000"))
        self.assertEqual(self.status(transport), b"HTTP/1.1 401 Unauthorized")
        self.assertTrue(transport.disconnecting)
        # What a client had already sent is thrown away, not kept.
        channel.dataReceived(b"x" * 1_000_000)
        self.assertNothingSpooled(channel)
        self.assertEqual(self.queue.flushed, [])

    def test_wrong_token_is_refused_before_the_body_too(self):
        channel, transport = self.connect()
        channel.dataReceived(self.post(b"Authorization: Bearer guess", b"Content-Length: 10"))
        self.assertEqual(self.status(transport), b"HTTP/1.1 401 Unauthorized")
        self.assertIn(b'error="invalid_token"', transport.value())
        self.assertTrue(transport.disconnecting)

    def test_declared_body_over_the_cap_is_413_with_the_token(self):
        channel, transport = self.connect()
        channel.dataReceived(
            self.post(b"Authorization: Bearer s3cret", b"Content-Length: %d" % (MAX_BODY + 1))
        )
        self.assertEqual(self.status(transport), b"HTTP/1.1 413 Content Too Large")
        self.assertEqual(transport.value().split(b"\r\n\r\n", 1)[1], b'{"error": "request body too large"}\n')
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.queue.flushed, [])

    def test_chunked_body_over_the_cap_is_413_with_the_token(self):
        channel, transport = self.connect()
        channel.dataReceived(self.post(b"Authorization: Bearer s3cret", b"Transfer-Encoding: chunked"))
        chunk = b"x" * 4096
        sent = 0
        while not transport.disconnecting and sent <= MAX_BODY:
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        self.assertEqual(sent, MAX_BODY + len(chunk))  # refused at the first octet over
        self.assertEqual(self.status(transport), b"HTTP/1.1 413 Content Too Large")
        channel.dataReceived(b"0\r\n\r\n")  # the end, in the same read: still not served
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.queue.flushed, [])

    def test_body_within_the_cap_is_served_with_the_token(self):
        channel, transport = self.connect()
        channel.dataReceived(
            self.post(b"Authorization: Bearer s3cret", b"Content-Length: %d" % MAX_BODY)
            + b"x" * MAX_BODY
        )
        self.assertEqual(self.status(transport), b"HTTP/1.1 202 Accepted")
        self.assertEqual(self.queue.flushed, ["A1"])

    def test_without_a_token_only_the_cap_applies(self):
        channel, transport = self.connect(token=None)
        channel.dataReceived(self.post(b"Content-Length: %d" % (MAX_BODY + 1)))
        self.assertEqual(self.status(transport), b"HTTP/1.1 413 Content Too Large")
        channel, transport = self.connect(token=None)
        channel.dataReceived(self.post(b"Content-Length: 0"))
        self.assertEqual(self.status(transport), b"HTTP/1.1 202 Accepted")

    def test_head_without_token_gets_headers_only(self):
        channel, transport = self.connect()
        channel.dataReceived(b"HEAD /health HTTP/1.1\r\nHost: admin.test\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n", 1)[0], b"HTTP/1.1 401 Unauthorized")
        self.assertIn(b"Content-Length: 0", head)
        self.assertEqual(body, b"")
