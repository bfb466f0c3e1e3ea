"""
RETR of a 50 MB message over real loopback TCP (plain and implicit TLS) from
a real Maildir: the bytes arrive exactly, and the process does not grow with
the message.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, ssl
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailserver.config import Config
from mailserver.from_config import certificate_files
from mailserver.login_throttle import throttle_for
from mailserver.maildir import MaildirStore
from mailserver.pop3 import POP3Dependencies, POP3Factory
from mailserver.testing import FakeRealm, make_pop3_config
from mailserver.tls import server_options

LINE = b".a line that starts with a dot and goes on for a while 0123456789\n"
LINES = 50 * 1024 * 1024 // len(LINE)
HEADER = b"Subject: big\n\n"


def write_message(maildir: Path) -> tuple[int, "hashlib._Hash"]:
    """
    Write the message in pieces; return its CRLF size and a SHA-256 fed
    with the RETR response it must produce.
    """
    size = len(HEADER) + 2 + LINES * (len(LINE) + 1)
    expected = hashlib.sha256(f"+OK {size} octets\r\n".encode() + b"Subject: big\r\n\r\n")
    (maildir / "cur").mkdir(parents=True)
    (maildir / "tmp").mkdir()
    new = maildir / "new"
    new.mkdir()
    block = LINE * 1024
    wire_block = (b"." + LINE[:-1] + b"\r\n") * 1024
    with open(new / f"1700000000.M1P1Q1.test,S={size - LINES - 2},W={size}", "wb") as f:
        f.write(HEADER)
        for _ in range(LINES // 1024):
            f.write(block)
            expected.update(wire_block)
        for _ in range(LINES % 1024):
            f.write(LINE)
            expected.update(b"." + LINE[:-1] + b"\r\n")
    expected.update(b".\r\n")
    return size, expected


def resident_kib() -> int:
    """
    The process's current resident size (not the peak, which an earlier
    test may already have raised).
    """
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


class RetrieveClient(Protocol):
    """
    Pipelines a login and RETR 1, hashes the response without keeping it.
    """

    def __init__(self) -> None:
        self.done: defer.Deferred[tuple[str, int]] = defer.Deferred()
        self.greeting = b""
        self.replies = b""
        self.digest = hashlib.sha256()
        self.received = 0
        self.peak_resident = 0

    def connectionMade(self) -> None:
        self.transport.write(b"USER bob@localhost\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n")

    def dataReceived(self, data: bytes) -> None:
        # Greeting, +OK to USER, +OK to PASS, then the RETR response.
        while self.replies.count(b"\r\n") < 3:
            end = data.find(b"\r\n")
            self.replies += data[: end + 2]
            data = data[end + 2 :]
            if end < 0:
                return
        self.digest.update(data)
        self.received += len(data)
        self.peak_resident = max(self.peak_resident, resident_kib())

    def connectionLost(self, reason) -> None:
        self.done.callback((self.replies, self.received))


class StreamingTests(unittest.TestCase):
    timeout = 60
    if not sys.platform.startswith("linux"):
        skip = "measures memory through /proc/self/statm"

    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that lands in the working directory.
        folder = tempfile.TemporaryDirectory(prefix="pop3-streaming-")
        self.addCleanup(folder.cleanup)
        self.tmp = Path(folder.name)
        self.size, self.expected = write_message(self.tmp / "mail")
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"bob@localhost", b"secret")
        self.portal = Portal(FakeRealm())
        self.portal.registerChecker(checker)

    def serve(self, implicit_tls: bool, tls_options) -> int:
        config = make_pop3_config()
        factory = POP3Factory(POP3Dependencies.for_listener(
            hostname=config.hostname,
            pop3=config.pop3,
            limits=config.limits,
            portal=self.portal,
            mailboxes=MaildirStore(lambda address: self.tmp / "mail", self.tmp),
            login_throttle=throttle_for(config.limits, reactor),
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
        ))
        served = TLSMemoryBIOFactory(tls_options, False, factory) if implicit_tls else factory
        port = reactor.listenTCP(0, served, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def retrieve(self, port: int, tls: bool) -> None:
        client = RetrieveClient()
        factory = ClientFactory.forProtocol(lambda: client)
        if tls:
            context = ssl.optionsForClientTLS("localhost", trustRoot=self.certificate())
            reactor.connectSSL("127.0.0.1", port, factory, context)
        else:
            reactor.connectTCP("127.0.0.1", port, factory)
        before = resident_kib()
        replies, received = await client.done
        growth_kib = client.peak_resident - before
        self.assertTrue(replies.startswith(b"+OK"), replies)
        quit_reply = b"+OK Logging out, 0 messages deleted.\r\n"
        self.assertEqual(received, self.size + LINES + 3 + len(f"+OK {self.size} octets\r\n") + len(quit_reply))
        expected = self.expected.copy()
        expected.update(quit_reply)
        self.assertEqual(client.digest.hexdigest(), expected.hexdigest())
        self.assertLess(growth_kib, 20 * 1024)
        # The message was marked seen: moved to cur/ with the S flag.
        self.assertEqual(len(list((self.tmp / "mail" / "cur").glob("*:2,S"))), 1)

    def certificate(self) -> ssl.Certificate:
        return ssl.Certificate.loadPEM(self.tls_config.certificate_path.read_bytes())

    def server_tls(self) -> ssl.CertificateOptions:
        self.tls_config = Config(hostname="localhost", data_dir=str(self.tmp / "data"))
        return server_options(certificate_files(self.tls_config))

    def test_plain_tcp(self):
        port = self.serve(False, None)
        return defer.ensureDeferred(self.retrieve(port, tls=False))

    def test_implicit_tls(self):
        port = self.serve(True, self.server_tls())
        return defer.ensureDeferred(self.retrieve(port, tls=True))
