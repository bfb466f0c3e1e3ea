"""
Operating the real server: third-party plugins, the admin API, reload on
SIGHUP, a graceful stop on SIGTERM, worker processes.
"""

from __future__ import annotations

import json
import poplib
import signal
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request

from harness import MailServer
from test_core import fetch_all, without_trace

from mailserver.message_ids import writer_pid

# The admin API refuses tokens shorter than 16 characters.
ADMIN_TOKEN = "t0ken-for-the-admin-api"

PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.hooks import Reject
from mailserver.interfaces import IEnvelopeHook, IPluginFactory


@implementer(IEnvelopeHook)
class NoSales:
    def __init__(self, code):
        self.code = code

    def sender(self, client, address):
        return None

    def recipient(self, client, sender, address):
        if address.lower().startswith("sales@"):
            return Reject(self.code, "5.7.1", "sales@ is closed, says the plugin")
        return None


@provider(IPlugin, IPluginFactory)
class NoSalesPlugin:
    name = "nosales"
    description = "Refuses mail to sales@."

    @staticmethod
    def build(options, context):
        return NoSales(options.get("code", 550))


plugin = NoSalesPlugin
'''


def test_a_third_party_plugin_refuses_a_recipient_with_its_own_code(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "nosales.py").write_text(PLUGIN)
    server = MailServer(
        tmp_path,
        extra_toml=f'[plugins]\npaths = ["{folder}"]\nenabled = ["nosales"]\n'
        "[plugins.nosales]\ncode = 553\n",
    )
    server.start()
    try:
        server.add_user("sales@localhost", "pw")
        server.add_user("bob@localhost", "pw")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.ehlo("client.test")
            client.mail("a@example.com")
            code, text = client.rcpt("sales@localhost")
            assert (code, text) == (553, b"5.7.1 sales@ is closed, says the plugin")
            assert client.rcpt("bob@localhost")[0] == 250
    finally:
        server.stop()


def admin(server, path: str, token: str | None = None, method: str = "GET"):
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.ports['admin']}{path}", method=method
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(text: bytes, name: str) -> float:
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_admin_api_health_metrics_queue_and_token(tmp_path):
    server = MailServer(tmp_path, extra_toml=f'[admin]\ntoken = "{ADMIN_TOKEN}"\n')
    server.start()
    try:
        assert admin(server, "/health")[0] == 401
        assert admin(server, "/health", "wrong")[0] == 401
        status, body = admin(server, "/health", ADMIN_TOKEN)
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ok"
        assert {entry["role"] for entry in health["listeners"]} >= {"smtp", "submission", "pop3"}
        _, before = admin(server, "/metrics", ADMIN_TOKEN)
        server.add_user("bob@localhost", "pw")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("a@example.com", ["bob@localhost"], b"Subject: m\r\n\r\nhi\r\n")
        fetch_all(server, "bob@localhost", "pw")
        _, after = admin(server, "/metrics", ADMIN_TOKEN)
        for name in ("smtp_messages_accepted_total", "smtp_connections_total", "pop3_logins_total"):
            assert metric(after, name) == metric(before, name) + 1, name
        status, body = admin(server, "/api/queue", ADMIN_TOKEN)
        assert status == 200 and json.loads(body) == []
        assert admin(server, "/api/queue/nosuch/flush", ADMIN_TOKEN, method="POST")[0] == 404
    finally:
        server.stop()


def test_admin_api_refuses_a_big_body_without_a_token_before_reading_it(tmp_path):
    server = MailServer(tmp_path, extra_toml=f'[admin]\ntoken = "{ADMIN_TOKEN}"\n')
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.ports["admin"]), timeout=30) as client:
            client.sendall(
                b"POST /api/queue/X/flush HTTP/1.1\r\nHost: mx.test\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (400 * 1024 * 1024)
            )
            answer = b""
            while chunk := client.recv(65536):  # the server closes: no body wanted
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        status, _ = admin(server, "/api/queue/X/flush", ADMIN_TOKEN, method="POST")
        assert status == 404  # with the token, the same call is served
    finally:
        server.stop()


def test_reload_picks_up_a_new_user_and_certificate(server):
    from mailserver.tls import ensure_self_signed

    def certificate_serial() -> int:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            client.starttls(context=context)
            der = client.sock.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    old = certificate_serial()
    tls = server.data_path / "tls"
    (tls / "cert.pem").unlink()
    (tls / "key.pem").unlink()
    ensure_self_signed(tls / "cert.pem", tls / "key.pem", "mx.test")
    assert certificate_serial() == old  # nothing changes until the reload
    server.add_user("new@localhost", "pw")
    result = server.cli("reload")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while certificate_serial() == old:
        assert time.monotonic() < deadline, "the certificate was not reloaded"
        time.sleep(0.1)
    assert fetch_all(server, "new@localhost", "pw") == []
    assert "reloaded accounts" in server.log()


def test_sigterm_during_data_loses_nothing_that_got_250(server):
    server.add_user("bob@localhost", "pw")
    client = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
    client.ehlo("client.test")
    client.mail("a@example.com")
    client.rcpt("bob@localhost")
    code, _ = client.docmd("DATA")
    assert code == 354
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the server is stopping while the transaction runs
    client.send(b"second half\r\n.\r\n")
    code, text = client.getreply()
    client.close()
    server.process.wait(30)
    server.stop()
    server.start()
    stored = [without_trace(m) for m in fetch_all(server, "bob@localhost", "pw")]
    if code == 250:
        assert stored == [b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"]
    else:
        assert 400 <= code < 500, (code, text)
        assert stored == []
    assert code == 250, "the running transaction should have been allowed to finish"


def _mail_until_both_processes_deliver(server) -> int:
    """
    Send one-connection messages to bob@localhost until both processes of a
    two-worker server have delivered one (the kernel spreads connections
    over them; the worker needs a moment to start); return how many were sent.
    """
    new = server.maildir("bob@localhost") / "new"
    writers: set[int | None] = set()
    sent = 0
    deadline = time.monotonic() + 30
    while len(writers) < 2 and time.monotonic() < deadline:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("a@example.com", ["bob@localhost"], b"Subject: w\r\n\r\nhi\r\n")
        sent += 1
        # Maildir names carry the pid of the process that wrote them.
        writers = {writer_pid(p.name) for p in new.iterdir()}
    assert len(writers) == 2, writers
    return sent


def test_two_workers_share_the_listeners_and_the_metrics_count_both(tmp_path):
    server = MailServer(tmp_path, extra_toml=f'workers = 2\n[admin]\ntoken = "{ADMIN_TOKEN}"\n')
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        sent = _mail_until_both_processes_deliver(server)
        new = server.maildir("bob@localhost") / "new"
        assert len(list(new.iterdir())) == sent
        # The primary serves /metrics; the worker's counts reach it within
        # about a second.
        counted = None
        deadline = time.monotonic() + 10
        while counted != sent and time.monotonic() < deadline:
            time.sleep(0.2)
            counted = metric(admin(server, "/metrics", ADMIN_TOKEN)[1], "smtp_messages_accepted_total")
        assert counted == sent
    finally:
        # twistd ends with the signal that stopped it, after a clean shutdown.
        assert server.stop() in (0, -signal.SIGTERM)
    assert "Server Shut Down" in server.log()
    # The worker's events are in the --logfile too, each line whole.
    assert server.log().count("[smtp.accepted#info]") == sent
    assert all(line[:4].isdigit() or line.startswith("\t")
               for line in server.log().splitlines() if line)


def _pop3_login(port: int, password: str) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user("bob@localhost")
        return client.pass_(password)
    except poplib.error_proto as e:
        return e.args[0]
    finally:
        client.sock.close()


def test_workers_divide_an_addresss_allowance_and_share_its_failures(tmp_path):
    # Four failed logins allowed, two checked by each process; every
    # process's delays count the failures seen by both.
    delay = 0.5
    server = MailServer(
        tmp_path,
        extra_toml=f"workers = 2\n[limits]\nmax_auth_failures_per_client = 4\nauth_failure_delay = {delay}\n",
    )
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        _mail_until_both_processes_deliver(server)
        port = server.ports["pop3"]
        assert _pop3_login(port, "pw").startswith(b"+OK")
        failures = tries = 0
        while failures < 3:  # two in one process, one in the other
            answer = _pop3_login(port, "wrong")
            failures += answer.startswith(b"-ERR [AUTH]")
            tries += 1
            assert tries < 60, "the kernel kept choosing the same process"
        time.sleep(0.5)  # the word goes from process to process
        while True:  # the last check: in the process that has done one
            started = time.monotonic()
            answer = _pop3_login(port, "wrong")
            if answer.startswith(b"-ERR [AUTH]"):
                break
            assert b"Too many failed logins" in answer
        # Its answer waits for all four failures, not the two seen there.
        assert time.monotonic() - started >= 4 * delay
        answers = [_pop3_login(port, "pw") for _ in range(16)]
        assert all(b"Too many failed logins" in a for a in answers), answers
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
