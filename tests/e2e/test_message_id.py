"""
One ID per message through the real server (issue 21, must show 4): the ID
in the 250 reply is the one in our Received field, in the Maildir file's
name, in C{mailserver queue show} (and C{flush} takes it), in every log
line about the message (acceptance, local delivery, each relay attempt,
the bounce, the report), in the webhook's events and in the report sent
to the sender.
"""

from __future__ import annotations

import json
import smtplib
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from harness import MailServer
from relay_fixtures import Recorder, SMTPPeer, free_port, wait_until

from mailserver.message_ids import is_message_id


class RefusingBad(Recorder):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bad@"):
            return "550 5.1.1 no such user here"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


class WebhookReceiver:
    """
    An HTTP server on loopback that keeps the JSON bodies POSTed to it.
    """

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def peer():
    smtp_peer = SMTPPeer(free_port())
    smtp_peer.handler = smtp_peer.controller.handler = RefusingBad()
    yield smtp_peer
    if smtp_peer.controller._thread is not None:
        smtp_peer.stop()


@pytest.fixture
def server(tmp_path, peer, webhook):
    mail_server = MailServer(
        tmp_path, local_domains=("localhost", "example.org"), json_log=True,
        extra_toml=(
            "[smtp]\nauth_over_plaintext = true\n"
            f'[relay]\ntransports = ["remote.test=127.0.0.1:{peer.port}"]\n'
            'tls_policies = ["remote.test=none"]\n'
            'retry_schedule = ["1h"]\nscan_interval = 0.2\nconnect_timeout = 2.0\n'
            '[plugins]\nenabled = ["webhook"]\n'
            f'[plugins.webhook]\nurl = "http://127.0.0.1:{webhook.port}/hook"\n'
        ),
    )
    mail_server.start()
    mail_server.add_user("s@example.org", "secret")
    mail_server.add_user("bob@example.org", "bob-pw")
    yield mail_server
    mail_server.stop()


def events(server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def maildir_files(server, address: str) -> list:
    maildir = server.maildir(address)
    # (A Maildir is made with its first message: none yet, no folders.)
    return [path for folder in ("new", "cur") if (maildir / folder).is_dir()
            for path in sorted((maildir / folder).iterdir())]


def test_the_id_of_the_250_reply_follows_the_message_everywhere(server, peer, webhook):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        client.mail("s@example.org")
        for address in ("bob@example.org", "ok@remote.test", "bad@remote.test"):
            assert client.rcpt(address)[0] == 250
        code, text = client.data(b"From: s@example.org\r\nSubject: follow me\r\n\r\nHello.\r\n")
    assert code == 250
    message_id = text.decode().rsplit(" ", 1)[1]
    assert is_message_id(message_id), text

    # The Received field and the file name of bob's copy.
    [stored] = maildir_files(server, "bob@example.org")
    assert stored.name.startswith(f"{message_id}.")
    assert f"(mailserver) with ESMTPA id {message_id};".encode() in stored.read_bytes()

    # The queue knows it by the same ID; the peer is down: deferred.
    assert wait_until(lambda: any(e["event"] == "relay.deferred" for e in events(server)))
    shown = server.cli("queue", "show", message_id)
    assert shown.returncode == 0, shown.stderr
    assert f"id: {message_id}" in shown.stdout and "ok@remote.test" in shown.stdout

    peer.start()
    flushed = server.cli("queue", "flush", message_id)
    assert flushed.returncode == 0, flushed.stderr
    assert wait_until(lambda: len(peer.messages) == 1)
    assert wait_until(lambda: len(maildir_files(server, "s@example.org")) == 1)
    assert wait_until(lambda: "empty" in server.cli("queue", "list").stdout)

    # The report to the sender names the ID.
    [report] = maildir_files(server, "s@example.org")
    report_text = report.read_bytes()
    assert f"X-Mailserver-Queue-ID: {message_id}".encode() in report_text
    assert b"bad@remote.test" in report_text

    # The webhook: the local delivery, the relayed and the bounced recipient.
    assert wait_until(lambda: len(webhook.received) >= 4)
    about = {(e["recipient"], e["status"]) for e in webhook.received
             if e["queue_id"] == message_id}
    assert about == {("bob@example.org", "delivered"), ("ok@remote.test", "relayed"),
                     ("bad@remote.test", "bounced")}

    # The log: grepping the ID shows the message's whole life.
    life = [e for e in events(server) if e.get("id") == message_id]
    names = [e["event"] for e in life]
    for name in ("smtp.accepted", "local.delivered", "relay.deferred", "relay.sent",
                 "relay.bounced", "relay.dsn_sent", "relay.removed"):
        assert name in names, (name, names)
    assert names.index("smtp.accepted") < names.index("relay.sent") < names.index("relay.removed")
    lines = [line for line in server.log().splitlines() if message_id in line]
    assert len(lines) >= len(life)
    [report_sent] = [e for e in life if e["event"] == "relay.dsn_sent"]
    assert report.name.startswith(f"{report_sent['report']}.")
