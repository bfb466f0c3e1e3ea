"""
STARTTLS over a real loopback socket with a self-signed certificate, driven
by smtplib and a raw socket in a thread while trial runs the reactor.
"""

import re
import smtplib
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.internet import reactor, ssl as twisted_ssl
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailserver.smtp import SMTPDependencies, SMTPFactory
from mailserver.testing import FakeAccounts, MemoryIntake, make_config, make_portal
from mailserver.tls import ensure_self_signed


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class STARTTLSLoopbackTests(unittest.TestCase):
    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        cert, key = f"{folder.name}/cert.pem", f"{folder.name}/key.pem"
        ensure_self_signed(Path(cert), Path(key), "mx.example.org")
        private = twisted_ssl.PrivateCertificate.loadPEM(
            Path(cert).read_bytes() + b"\n" + Path(key).read_bytes()
        )
        config = make_config()
        self.intake = MemoryIntake()
        factory = SMTPFactory(SMTPDependencies.for_listener(
            role="submission",
            hostname=config.hostname,
            smtp=config.smtp,
            limits=config.limits,
            accounts=FakeAccounts(config, ["bob@example.org"]),
            portal=make_portal(**{"bob@example.org": "secret"}),
            intake=self.intake,
            tls_options=private.options(),
            reactor=reactor,
        ))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.address = ("127.0.0.1", self.port.getHost().port)

    def test_smtplib_starttls_auth_and_send(self):
        def session():
            with smtplib.SMTP(*self.address, timeout=10) as client:
                client.ehlo("client.test")
                client.starttls(context=client_context())
                client.ehlo("client.test")
                client.login("bob@example.org", "secret")
                client.sendmail("bob@example.org", ["x@remote.net"], b"Subject: t\r\n\r\nover TLS\r\n")

        def check(_):
            (stored,) = self.intake.finished
            self.assertIn(b" with ESMTPSA id ", stored.data)
            self.assertIn(b"(using TLSv1.", stored.data)
            self.assertTrue(stored.data.endswith(b"over TLS\r\n"))
            # The envelope tells plugins (Rspamd's Queue-Id, TLS-Version,
            # TLS-Cipher) the Received field's id and the TLS in use.
            envelope = stored.envelope
            received_id = re.search(rb" with ESMTPSA id ([0-9A-Z]{16})", stored.data).group(1)
            self.assertEqual(envelope.id, received_id.decode())
            self.assertTrue(envelope.tls_version.startswith("TLSv1."))
            self.assertIn(f"using {envelope.tls_version} with cipher {envelope.tls_cipher}".encode(),
                          stored.data)

        return deferToThread(session).addCallback(check)

    def test_pipelined_command_after_starttls_is_never_answered(self):
        def session():
            raw = socket.create_connection(self.address, timeout=10)
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"EHLO c\r\n")
            while reader.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\nNOOP\r\n")
            assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
            tls = client_context().wrap_socket(raw, server_hostname="mx.example.org")
            tls.sendall(b"EHLO again\r\n")
            first = tls.makefile("rb").readline()
            tls.close()
            return first

        return deferToThread(session).addCallback(
            lambda first: self.assertEqual(first, b"250-mx.example.org\r\n")
        )
