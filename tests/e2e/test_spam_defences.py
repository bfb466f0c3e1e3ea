"""
The spam and abuse defences in the real C{twistd mailserver} process:

  - the C{rspamd} plugin with a real Rspamd on loopback: GTUBE refused 550
    at the end of DATA with nothing stored, a clean message stored with
    Rspamd's headers, Rspamd stopped: delivered unscanned (fallback
    C{accept}) or 451 and delivered once Rspamd is back (C{tempfail});
  - a DNS blocklist served by a C{twisted.names} server on loopback: a
    client on a listed loopback address (127.0.0.2) is refused at
    connection naming the list, the same address submitting with AUTH is
    not; an early talker is refused;
  - greylisting: 451 first, accepted on a retry after the delay with a
    restart in between;
  - the hourly submission limit, counted over two worker processes;

and every refusal counted by reason in C{/metrics}.
"""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request

import pytest

from harness import MailServer
from tests.dns_zone import DNSProcess
from tests.rspamd_engine import GTUBE, RspamdEngine, installed

from mailserver.message_ids import writer_pid

needs_rspamd = pytest.mark.skipif(
    not installed(), reason="rspamd is not installed (.ci/run installs Debian's)")

CLEAN = b"From: <alice@example.net>\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"
SPAM = b"From: <alice@example.net>\r\nSubject: money\r\n\r\n" + GTUBE + b"\r\n"


def metrics(server: MailServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['admin']}/metrics") as answer:
        return answer.read().decode()


def refusals(server: MailServer, reason: str) -> float:
    # Worker processes report their counts about once a second.
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics(server).splitlines()
        if line.startswith("smtp_refusals_total{") and f'reason="{reason}"' in line
    )


def stored(server: MailServer, address: str) -> list[bytes]:
    new = server.maildir(address) / "new"
    return [path.read_bytes() for path in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    if not installed():
        pytest.skip("rspamd is not installed (.ci/run installs Debian's)")
    engine = RspamdEngine(tmp_path_factory.mktemp("rspamd")).start()
    yield engine
    engine.stop()


def rspamd_server(tmp_path, url: str, fallback: str = "accept") -> MailServer:
    server = MailServer(tmp_path, extra_toml=(
        '[plugins]\nenabled = ["rspamd"]\n'
        f'[plugins.rspamd]\nurl = "{url}"\ntimeout = 10\nfallback = "{fallback}"\n'
    ))
    server.start()
    server.add_user("bob@localhost", "secret")
    return server


@needs_rspamd
def test_rspamd_refuses_gtube_and_stores_clean_mail_with_its_headers(tmp_path, rspamd):
    server = rspamd_server(tmp_path, rspamd.url)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.net", ["bob@localhost"], SPAM)
            assert refused.value.smtp_code == 550
            assert refused.value.smtp_error == b"5.7.1 Gtube pattern"
            assert stored(server, "bob@localhost") == []
            client.sendmail("alice@example.net", ["bob@localhost"], CLEAN)
        [message] = stored(server, "bob@localhost")
        # (Maildir files have LF line ends.)
        assert b"\nX-Spamd-Result: default: False [0.00 / 15.00];\n\tTEST_ENVELOPE" in message
        assert b"ip=127.0.0.1,helo=" in message and b"from=alice@example.net" in message
        assert message.endswith(b"\n\nSee you at noon.\n")
        assert refusals(server, "rspamd") == 1
        assert ("refused command=DATA, code=550, enhanced=5.7.1, reason=rspamd,"
                " reply=Gtube pattern, client=127.0.0.1") in server.log()
    finally:
        server.stop()


@needs_rspamd
def test_rspamd_stopped_delivers_unscanned_by_default(tmp_path):
    engine = RspamdEngine(tmp_path / "rspamd").start()
    server = rspamd_server(tmp_path, engine.url)
    try:
        engine.stop()
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("alice@example.net", ["bob@localhost"], SPAM)
        [message] = stored(server, "bob@localhost")
        assert b"X-Spamd-Result" not in message and GTUBE in message
        assert "delivering unscanned" in server.log()
    finally:
        server.stop()
        engine.stop()


@needs_rspamd
def test_rspamd_stopped_is_a_temporary_failure_and_the_retry_is_delivered(tmp_path):
    engine = RspamdEngine(tmp_path / "rspamd").start()
    server = rspamd_server(tmp_path, engine.url, fallback="tempfail")
    try:
        engine.stop()
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.net", ["bob@localhost"], CLEAN)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.7.1")
        assert stored(server, "bob@localhost") == []
        engine.start(port=engine.port)  # back where the server looks for it
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("alice@example.net", ["bob@localhost"], CLEAN)  # the client's retry
        [message] = stored(server, "bob@localhost")
        assert b"X-Spamd-Result:" in message
    finally:
        server.stop()
        engine.stop()


# DNS blocklists and early talkers.

ZONE = {"2.0.0.127.bl.test": {"A": ["127.0.0.2"]}}


@pytest.fixture
def dns_server():
    server = DNSProcess(ZONE)
    yield server
    server.stop()


def test_a_listed_client_is_refused_at_connection_but_may_submit(tmp_path, dns_server):
    server = MailServer(tmp_path, extra_toml=(
        f'[relay]\nresolver = "{dns_server.resolver}"\n'
        '[checks]\nskip_networks = []\ndnsbl = ["bl.test=127.0.0.[2..11]*2"]\n'
        'dnsbl_timeout = 3.0\n'
    ))
    server.start()
    try:
        server.add_user("bob@localhost", "secret")
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30,
                         source_address=("127.0.0.2", 0))
        assert refused.value.smtp_code == 554
        assert refused.value.smtp_error == (
            b"5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            assert client.noop()[0] == 250  # 127.0.0.1 is not listed
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30,
                          source_address=("127.0.0.2", 0)) as client:
            client.login("bob@localhost", "secret")
            client.sendmail("bob@localhost", ["bob@localhost"], b"Subject: mine\r\n\r\nhi\r\n")
        assert len(stored(server, "bob@localhost")) == 1
        assert refusals(server, "dnsbl") == 1
        assert ("[smtp.rejected#warn] refused command=CONNECT, code=554, enhanced=5.7.1,"
                " reason=dnsbl, reply=Service unavailable; client [127.0.0.2] blocked using"
                " bl.test, client=127.0.0.2, helo=, user=") in server.log()
    finally:
        server.stop()


def test_an_early_talker_is_refused(tmp_path):
    server = MailServer(tmp_path, extra_toml=(
        "[checks]\nenabled = false\nskip_networks = []\ngreet_delay = 1.0\n"))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30) as early:
            early.sendall(b"EHLO spam.example\r\n")
            answer = early.makefile("rb").read()
        assert answer == (b"554 5.5.0 Error: SMTP protocol synchronization"
                          b" (talked before the greeting)\r\n")
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as patient:
            assert time.monotonic() - started >= 0.9
            assert patient.ehlo()[0] == 250
        assert refusals(server, "pregreet") == 1
    finally:
        server.stop()


# Greylisting.


def test_greylisting_survives_a_restart(tmp_path):
    server = MailServer(tmp_path, extra_toml=(
        '[checks]\nenabled = false\nskip_networks = []\ngreylist = true\n'
        'greylist_delay = "2s"\n'))
    server.start()
    try:
        server.add_user("bob@localhost", "secret")
        first = time.monotonic()
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("alice@example.net", ["bob@localhost"], CLEAN)
        [(code, text)] = refused.value.recipients.values()
        assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 2 seconds")
        assert refusals(server, "greylist") == 1
        server.stop()
        server.start()  # the same data folder: what was learnt is still known
        time.sleep(max(0.0, first + 2.2 - time.monotonic()))
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("alice@example.net", ["bob@localhost"], CLEAN)  # the retry
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # a new triplet waits
                client.sendmail("alice@example.net", ["postmaster@localhost"], CLEAN)
        assert len(stored(server, "bob@localhost")) == 1
    finally:
        server.stop()


# The hourly submission limit over two processes.

LIMIT = 20


def test_the_hourly_limit_holds_over_two_worker_processes(tmp_path):
    server = MailServer(tmp_path, extra_toml=(
        f"workers = 2\n[limits]\nsubmission_messages_per_hour = {LIMIT}\n"))
    server.start()
    try:
        server.add_user("bob@localhost", "secret")
        answers = []
        for n in range(LIMIT + 6):
            with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
                client.login("bob@localhost", "secret")
                try:
                    client.sendmail("bob@localhost", ["bob@localhost"], b"Subject: %d\r\n\r\nx\r\n" % n)
                    answers.append(250)
                except smtplib.SMTPSenderRefused as e:
                    assert e.smtp_error.startswith(
                        b"4.7.1 Sending limit of 20 messages per hour reached for bob@localhost;"
                        b" try again after ")
                    answers.append(e.smtp_code)
        assert answers == [250] * LIMIT + [450] * 6
        # Maildir file names start with the message ID, which carries the
        # writing process's pid: both took a share.
        writers = {writer_pid(p.name)
                   for p in (server.maildir("bob@localhost") / "new").iterdir()}
        assert len(writers) == 2, writers
        deadline = time.monotonic() + 10
        while refusals(server, "rate") < 6 and time.monotonic() < deadline:
            time.sleep(0.2)  # the workers' counts arrive within a second
        assert refusals(server, "rate") == 6
    finally:
        server.stop()
