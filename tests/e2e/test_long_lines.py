"""
Messages with lines over 998 octets in the real server (issue 21, must
show 2): with the default limits, the server accepts a 5,000-octet line
and serves it byte for byte over POP3; relayed to an
aiosmtpd peer (which refuses lines over 1,000 octets, as RFC 5321 allows),
the message arrives with no line over 998 octets, decodes to what was sent,
and its DKIM signature, made at submission, verifies there.
"""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from harness import MailServer
from relay_fixtures import SMTPPeer, wait_until
from test_core import fetch_all

from mailserver.mailauth.keys import generate, parse_key, txt_record, write_key

pytestmark = pytest.mark.filterwarnings("ignore::BytesWarning")  # dkimpy's debug lines

PEM = generate("rsa")
KEY = parse_key(PEM)
LINE = ("Grüße aus der langen Zeile. " * 180).encode()  # 5,220 octets, no line end

PLAIN = (b"From: S <s@example.org>\r\nTo: user@remote.test, bob@example.org\r\n"
         b"Subject: a long line\r\n\r\nBefore.\r\n" + LINE + b"\r\nAfter.\r\n")
MIME = (b"From: S <s@example.org>\r\nTo: user@remote.test, bob@example.org\r\n"
        b"Subject: " + b"newsletter " * 200 + b"\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nShort.\r\n"
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n<p>" + LINE + b"</p>\r\n"
        b"--b1--\r\n")


@pytest.fixture(autouse=True)
def long_pop3_lines(monkeypatch):
    import poplib

    monkeypatch.setattr(poplib, "_MAXLINE", 20_000)  # poplib's own limit is 2,048


@pytest.fixture
def peer():
    smtp_peer = SMTPPeer().start()
    yield smtp_peer
    smtp_peer.stop()


@pytest.fixture
def server(tmp_path, peer):
    mail_server = MailServer(
        tmp_path, local_domains=("localhost", "example.org"),
        extra_toml=(
            "[smtp]\nauth_over_plaintext = true\n"
            f'[relay]\ntransports = ["remote.test=127.0.0.1:{peer.port}"]\n'
            'tls_policies = ["remote.test=none"]\n'
            'retry_schedule = ["1s"]\nscan_interval = 0.5\nconnect_timeout = 2.0\n'
            '[dkim]\nkeys = ["example.org:e2e"]\n'
        ),
    )
    write_key(mail_server.data_path / "dkim" / "example.org.e2e.key", PEM)
    mail_server.start()
    mail_server.add_user("s@example.org", "secret")
    mail_server.add_user("bob@example.org", "bob-pw")
    yield mail_server
    mail_server.stop()


def dnsfunc(name, timeout=5):
    assert name == b"e2e._domainkey.example.org."
    return txt_record(KEY).encode()


def test_a_5000_octet_line_is_stored_as_it_came_and_relayed_fitted_and_signed(server, peer):
    import dkim

    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        for message in (PLAIN, MIME):
            client.sendmail("s@example.org", ["user@remote.test", "bob@example.org"], message)
    received = peer.wait_for(2)
    assert len(received) == 2, server.log()
    by_subject = sorted(received, key=lambda r: b"Subject: a long line" not in r[2])
    for (_, _, data), sent in zip(by_subject, (PLAIN, MIME)):
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        assert data.startswith(b"DKIM-Signature: ")
        assert dkim.verify(data, dnsfunc=dnsfunc), data[:2000]
        arrived = email.message_from_bytes(data, policy=email.policy.default)
        original = email.message_from_bytes(sent, policy=email.policy.default)
        assert arrived["Subject"] == original["Subject"]
        assert ([part.get_payload(decode=True) for part in arrived.walk()
                 if not part.is_multipart()]
                == [part.get_payload(decode=True) for part in original.walk()
                    if not part.is_multipart()])
    # The local copy is the message as it came (with the trace fields and
    # the signature on top), the long line whole.
    stored = fetch_all(server, "bob@example.org", "bob-pw")
    assert len(stored) == 2
    stored.sort(key=lambda fetched: b"Subject: a long line" not in fetched)
    for fetched, sent in zip(stored, (PLAIN, MIME)):
        # Submission added the Date and Message-ID fields it lacked.
        head, body = sent.split(b"\r\n\r\n", 1)
        fetched_head = fetched.split(b"\r\n\r\n", 1)[0]
        assert fetched.endswith(b"\r\n\r\n" + body) and LINE in fetched
        assert fetched_head.endswith(head + b"\r\n" + b"Date: " + fetched_head.split(b"Date: ")[1])
        assert b"\r\nMessage-ID: <" in fetched_head
    assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)


def test_a_5000_octet_line_from_outside_is_served_byte_for_byte(server):
    message = b"From: someone@remote.test\r\nSubject: in\r\n\r\n" + LINE + b"\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        client.sendmail("someone@remote.test", ["bob@example.org"], message)
    [fetched] = fetch_all(server, "bob@example.org", "bob-pw")
    assert fetched.startswith(b"Return-Path: <someone@remote.test>\r\nReceived: from ")
    assert fetched.endswith(b"\r\n" + message)
