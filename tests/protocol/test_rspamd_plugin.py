"""
The C{rspamd} plugin's message hook against a real Rspamd on 127.0.0.1
(L{tests.rspamd_engine}; its rules force each action by a word in the
Subject and echo what it was told), then against peers that fail in each
way an HTTP service can: nothing listening, no answer, an HTTP error, an
answer that is not Rspamd's.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web import resource, server

from mailserver.envelope import Envelope, Recipient
from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks, MessageBody, MessageHeaders, Reject
from mailserver.intake import SPILL_SIZE
from mailserver.plugins.rspamd import RspamdScanner
from mailserver.testing import MemoryIntake
from tests.rspamd_engine import GTUBE, RspamdEngine, free_port, installed

ENVELOPE = Envelope(
    sender="alice@example.net",
    recipients=(Recipient("bob@example.org", ("bob@example.org",)),
                Recipient("carol@example.org", ("carol@example.org",))),
    client_address="192.0.2.25",
    helo="mail.example.net",
    id="0123456789AB",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
)


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


def message(subject: str, body: bytes = b"Hello Bob,\r\nsee you.\r\n",
            extra: bytes = b"") -> tuple[MessageHeaders, MessageBody]:
    head = (b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\n"
            b"Subject: " + subject.encode() + b"\r\n" + extra)
    spool = tempfile.SpooledTemporaryFile(max_size=SPILL_SIZE)
    spool.write(body)
    return MessageHeaders(head), MessageBody(spool)


def options(verdict: MessageHeaders) -> dict[str, str]:
    """
    What TEST_ENVELOPE reported, from the X-Spamd-Result field.
    """
    result = verdict.get("X-Spamd-Result")
    inside = result.split("TEST_ENVELOPE(0.00)[", 1)[1].split("]", 1)[0]
    return dict(item.split("=", 1) for item in inside.split(","))


class WithRspamd(unittest.TestCase):
    engine: RspamdEngine | None = None

    @classmethod
    def setUpClass(cls) -> None:
        if not installed():
            raise unittest.SkipTest("rspamd is not installed (.ci/run installs Debian's)")
        cls.engine = RspamdEngine(tempfile.mkdtemp(prefix="rspamd-test-")).start()

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.engine is not None:
            cls.engine.stop()
            shutil.rmtree(cls.engine.folder, ignore_errors=True)

    def scanner(self, **kwargs) -> RspamdScanner:
        self.warnings: list[str] = []
        kwargs.setdefault("url", self.engine.url)
        return RspamdScanner(reactor=reactor, hostname="mx.test", log=self.logger(), **kwargs)

    def logger(self) -> Logger:
        from twisted.logger import formatEvent

        return Logger(observer=lambda event: self.warnings.append(formatEvent(event)))

    @inline
    async def test_gtube_is_rejected_with_rspamds_message(self):
        headers, body = message("free money", body=GTUBE + b"\r\n")
        verdict = await self.scanner().message(ENVELOPE, headers, body)
        self.assertEqual(verdict, Reject(550, "5.7.1", "Gtube pattern", reason="rspamd"))

    @inline
    async def test_a_clean_message_gets_rspamds_headers_and_loses_forged_ones(self):
        headers, body = message("lunch", extra=b"X-Spam: Yes\r\nX-Spamd-Result: forged\r\n")
        verdict = await self.scanner().message(ENVELOPE, headers, body)
        self.assertIsNone(verdict)
        self.assertEqual(headers.get_all("X-Spam"), [])
        [result] = headers.get_all("X-Spamd-Result")
        self.assertTrue(result.startswith("default: False [0.00 / 15.00];"))
        self.assertEqual(headers.get("X-Spam-Status"), "No, score=0.00")
        self.assertIn(b"X-Spamd-Result: default: False [0.00 / 15.00];\r\n\tTEST_ENVELOPE",
                      headers.to_bytes())

    @inline
    async def test_rspamd_is_told_the_envelope_and_the_session(self):
        headers, body = message("lunch")
        head_size = len(headers.to_bytes())
        await self.scanner().message(ENVELOPE, headers, body)
        told = options(headers)
        self.assertEqual(told["ip"], "192.0.2.25")
        self.assertEqual(told["helo"], "mail.example.net")
        self.assertEqual(told["from"], "alice@example.net")
        self.assertEqual(told["rcpt"], "bob@example.org carol@example.org")
        self.assertEqual(told["queue-id"], "0123456789AB")
        self.assertEqual(told["tls"], "TLSv1.3/TLS_AES_256_GCM_SHA384")
        self.assertEqual(told["mta"], "mx.test")
        self.assertEqual(told["user"], "")
        self.assertEqual(int(told["size"]), head_size + 2 + body.size)

    @inline
    async def test_a_large_message_is_streamed_whole(self):
        body = b"".join(b"line %07d of a long message\r\n" % i for i in range(100_000))
        self.assertGreater(len(body), SPILL_SIZE)  # on disk, as the hook runner keeps it
        headers, spooled = message("big", body=body)
        head_size = len(headers.to_bytes())
        await self.scanner().message(ENVELOPE, headers, spooled)
        self.assertEqual(int(options(headers)["size"]), head_size + 2 + len(body))

    @inline
    async def test_authenticated_mail_names_the_user_or_is_not_scanned(self):
        own = Envelope(sender="bob@example.org", recipients=ENVELOPE.recipients,
                       client_address="192.0.2.30", authenticated="bob@example.org")
        headers, body = message("lunch")
        await self.scanner().message(own, headers, body)
        self.assertEqual(options(headers)["user"], "bob@example.org")
        self.assertEqual(options(headers)["from"], "bob@example.org")
        headers, body = message("free money", body=GTUBE + b"\r\n")
        self.assertIsNone(await self.scanner(scan_authenticated=False).message(own, headers, body))
        self.assertIsNone(headers.get("X-Spamd-Result"))

    @inline
    async def test_the_null_sender(self):
        bounce = Envelope(sender="", recipients=ENVELOPE.recipients, client_address="192.0.2.25")
        headers, body = message("Undelivered Mail Returned to Sender")
        self.assertIsNone(await self.scanner().message(bounce, headers, body))
        self.assertEqual(options(headers)["from"], "")

    @inline
    async def test_add_header_marks_the_message_as_spam(self):
        headers, body = message("cheap watches [add-header]")
        self.assertIsNone(await self.scanner().message(ENVELOPE, headers, body))
        self.assertEqual(headers.get_all("X-Spam"), ["Yes"])
        self.assertEqual(headers.get("X-Spam-Status"), "Yes, score=7.00")
        self.assertEqual(headers.get("Subject"), "cheap watches [add-header]")

    @inline
    async def test_rewrite_subject(self):
        headers, body = message("cheap watches [rewrite]")
        self.assertIsNone(await self.scanner().message(ENVELOPE, headers, body))
        self.assertEqual(headers.get_all("Subject"), ["***SPAM*** cheap watches [rewrite]"])
        self.assertEqual(headers.get("X-Spam"), "Yes")

    @inline
    async def test_greylist_and_soft_reject_are_temporary(self):
        for word in ("[greylist]", "[soft-reject]"):
            headers, body = message(f"hello {word}")
            verdict = await self.scanner().message(ENVELOPE, headers, body)
            self.assertEqual((verdict.code, verdict.enhanced), (451, "4.7.1"), word)

    @inline
    async def test_result_header_spam_and_never(self):
        headers, body = message("lunch")
        await self.scanner(result_header="never").message(ENVELOPE, headers, body)
        self.assertIsNotNone(headers.get("X-Spamd-Result"))  # Rspamd's own milter header stays
        headers, body = message("lunch")
        scanner = self.scanner(result_header="spam")
        scanner._apply({"action": "no action", "score": 1.0, "required_score": 15}, headers)
        self.assertIsNone(headers.get("X-Spamd-Result"))
        scanner._apply({"action": "add header", "score": 7.0, "required_score": 15}, headers)
        self.assertEqual(headers.get("X-Spamd-Result"), "default: False [7.00 / 15.00]")

    @inline
    async def test_a_message_over_max_size_is_not_scanned(self):
        headers, body = message("free money", body=GTUBE + b"\r\n")
        self.assertIsNone(await self.scanner(max_size=50).message(ENVELOPE, headers, body))
        self.assertIsNone(headers.get("X-Spamd-Result"))

    @inline
    async def test_through_the_hook_runner_and_the_intake(self):
        """
        As the server wires it: the message arrives in pieces, the runner
        refuses GTUBE (nothing reaches the intake) and stores the rest with
        Rspamd's fields.
        """
        hooks = Hooks([("rspamd", self.scanner())])
        reasons = []
        inner = MemoryIntake()
        intake = HookedIntake(inner, hooks, tempfile.mkdtemp())
        for body in (GTUBE, b"just a note"):
            receiver = intake.begin(ENVELOPE)
            receiver.write(b"Subject: x\r\n\r\n")
            receiver.write(body + b"\r\n")
            try:
                await receiver.finish()
            except Exception as e:
                self.assertEqual(e.reject.code, 550)
                reasons.append(e.reject.reason)
        self.assertEqual(reasons, ["rspamd"])
        [stored] = inner.finished
        self.assertIn(b"X-Spamd-Result: default: False", stored.data)
        self.assertTrue(stored.data.endswith(b"\r\n\r\njust a note\r\n"))


class SilentPeer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass  # reads the request, never answers


class Answer(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code, self.body = code, body

    def render_POST(self, request):
        request.content.read()
        request.setResponseCode(self.code)
        return self.body


class WhenRspamdFails(unittest.TestCase):
    def scanner(self, url: str, **kwargs) -> RspamdScanner:
        from twisted.logger import formatEvent

        self.warnings: list[str] = []
        log = Logger(observer=lambda event: self.warnings.append(formatEvent(event)))
        return RspamdScanner(url=url, reactor=reactor, hostname="mx.test", log=log, **kwargs)

    def serve(self, factory) -> str:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def outcome(self, url: str, **kwargs):
        headers, body = message("lunch")
        verdict = await self.scanner(url, **kwargs).message(ENVELOPE, headers, body)
        return verdict, headers

    @inline
    async def test_nothing_listening_is_accepted_and_logged_by_default(self):
        url = f"http://127.0.0.1:{free_port()}"
        verdict, headers = await self.outcome(url)
        self.assertIsNone(verdict)
        self.assertIsNone(headers.get("X-Spamd-Result"))
        [warning] = self.warnings
        self.assertIn("delivering unscanned", warning)
        self.assertIn("0123456789AB from 192.0.2.25", warning)

    @inline
    async def test_nothing_listening_is_a_temporary_failure_when_configured(self):
        verdict, _ = await self.outcome(f"http://127.0.0.1:{free_port()}", fallback="tempfail")
        self.assertEqual(verdict, Reject(451, "4.7.1", "Content filter unavailable, please try"
                                         " again later", reason="rspamd"))
        self.assertIn("answering 451", self.warnings[0])

    @inline
    async def test_a_peer_that_never_answers_times_out(self):
        url = self.serve(Factory.forProtocol(SilentPeer))
        started = reactor.seconds()
        verdict, _ = await self.outcome(url, timeout=0.5, fallback="tempfail")
        self.assertEqual(verdict.code, 451)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertIn("no answer in 0.5 seconds", self.warnings[0])

    @inline
    async def test_an_http_error_or_an_answer_not_from_rspamd(self):
        for code, body, problem in (
            (500, b"oops", "HTTP 500"),
            (200, b"<html>", "not JSON"),
            (200, json.dumps({"score": 1}).encode(), "no action"),
        ):
            url = self.serve(server.Site(Answer(code, body)))
            verdict, _ = await self.outcome(url)
            self.assertIsNone(verdict)
            self.assertIn(problem, self.warnings[-1])


class Pieces(unittest.TestCase):
    """
    The parts of the plugin that need no peer.
    """

    def test_the_message_file_reads_head_blank_line_and_body(self):
        from mailserver.plugins.rspamd import _MessageFile

        spool = io.BytesIO(b"body line\r\n" * 1000)
        reader = _MessageFile(b"Subject: s\r\n", MessageBody(spool))
        reader.seek(0, 2)
        self.assertEqual(reader.tell(), 14 + 11000)
        reader.seek(0)
        out = b"".join(iter(lambda: reader.read(333), b""))
        self.assertEqual(out, b"Subject: s\r\n\r\n" + b"body line\r\n" * 1000)
        reader.seek(0)
        self.assertEqual(reader.read(9), b"Subject: ")

    def test_milter_removals_by_position(self):
        from mailserver.plugins.rspamd import _remove

        headers = MessageHeaders(b"X-A: 1\r\nX-A: 2\r\nX-A: 3\r\nSubject: s\r\n")
        _remove(headers, "X-A", 2)
        self.assertEqual(headers.get_all("X-A"), ["1", "3"])
        _remove(headers, "X-A", -1)
        self.assertEqual(headers.get_all("X-A"), ["1"])
        _remove(headers, "X-A", 5)
        _remove(headers, "X-A", "all")
        self.assertEqual(headers.get_all("X-A"), ["1"])
        _remove(headers, "X-A", 0)
        self.assertEqual(headers.get_all("X-A"), [])

    def test_fields_rspamd_asks_for_are_written_safely(self):
        from mailserver.plugins.rspamd import _field

        self.assertEqual(_field("X-R", "a;\r\n\tb"), b"X-R: a;\r\n\tb\r\n")
        self.assertEqual(_field("X-R", "a\nb"), b"X-R: a\r\n\tb\r\n")  # continuation made so
        self.assertEqual(_field("Subject", "Grüße"), b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n")
        self.assertIsNone(_field("Bad Name", "x"))
        self.assertIsNone(_field("", "x"))

    def test_options_are_checked(self):
        from mailserver.hooks import PluginContext, PluginOptionsError
        from mailserver.plugins.rspamd import RspamdPlugin

        context = PluginContext(reactor=reactor, hostname="mx.test", data_path=None)
        built = RspamdPlugin.build({}, context)
        self.assertEqual(built.url, "http://127.0.0.1:11333/checkv2")
        for bad, key in (
            ({"url": "ftp://x"}, "url"),
            ({"timeout": 0}, "timeout"),
            ({"timeout": "5"}, "timeout"),
            ({"fallback": "drop"}, "fallback"),
            ({"result_header": "sometimes"}, "result_header"),
            ({"max_size": -1}, "max_size"),
            ({"scan_authenticated": "yes"}, "scan_authenticated"),
            ({"password": "a\nb"}, "password"),
            ({"colour": "red"}, "colour"),
        ):
            with self.assertRaises(PluginOptionsError) as refused:
                RspamdPlugin.build(bad, context)
            self.assertEqual(refused.exception.key, key)
