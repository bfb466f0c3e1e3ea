"""
Every refusal is logged and counted (issue 21, must show 3): for each kind,
one C{smtp.rejected} event (C{smtp.auth_failed}, C{smtp.auth_throttled}
for logins) with the client, HELO, user, command, codes and reason, its
text line, and C{smtp_refusals_total} by that reason: the server's own,
the spam defences' (dnsbl, pregreet, greylist, rate, rspamd) and a plugin's.
The DMARC and SPF refusals of the inbound checks are in
test_mailauth_hooks.py (through a session with the real checks).
"""

from __future__ import annotations

import tempfile
from base64 import b64encode
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks, Reject
from mailserver.interfaces import IConnectionHook, IEnvelopeHook, IMessageHook
from mailserver.testing import LOOPBACK, REMOTE, MemoryIntake, SMTPHarness, make_config, reply_codes

CLIENT = "client.example.net"


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def refusals(events, name: str = "smtp.rejected") -> list[dict]:
    return [e for e in events if e.get("event") == name]


def counted(session: SMTPHarness, reason: str, role: str = "smtp") -> float:
    return session.factory.dependencies.metrics.smtp_refusals_total.value(role=role, reason=reason)


def check(events, session, *, command, code, enhanced, reason, user="", role="smtp",
          name="smtp.rejected", client=None, **fields) -> dict:
    """
    The one event of this refusal, its fields and text; its count.
    """
    [event] = refusals(events, name)
    assert (event["command"], event["code"], event["enhanced"], event["reason"]) == (
        command, code, enhanced, reason)
    assert event["client"] == (client or session.transport.getPeer().host)
    assert event["helo"] == (CLIENT if command not in ("CONNECT",) else "")
    assert event["user"] == user
    for key, value in fields.items():
        assert event[key] == value, key
    text = formatEvent(event)
    assert f"command={command}, code={code}, enhanced={enhanced}, reason={reason}" in text
    assert counted(session, reason, role) == 1
    return event


def in_transaction(**kwargs) -> SMTPHarness:
    session = SMTPHarness(**kwargs)
    session.ehlo()
    assert reply_codes(session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
                       ) == ["250 2.1.0", "250 2.1.5"]
    return session


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64encode(f"\0{user}\0{password}".encode()).decode() + "\r\n"


def test_relay_denied(events):
    session = SMTPHarness()
    session.ehlo()
    out = session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<x@elsewhere.example>\r\n")
    assert reply_codes(out) == ["250 2.1.0", "554 5.7.1"]
    check(events, session, command="RCPT", code=554, enhanced="5.7.1", reason="relay-denied",
          sender="a@remote.net", recipient="x@elsewhere.example")


def test_unknown_recipient(events):
    session = SMTPHarness()
    session.ehlo()
    out = session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<nobody@example.org>\r\n")
    assert reply_codes(out) == ["250 2.1.0", "550 5.1.1"]
    event = check(events, session, command="RCPT", code=550, enhanced="5.1.1",
                  reason="unknown-recipient", recipient="nobody@example.org")
    assert event["reply"] == "Recipient address rejected: User unknown"


def test_auth_required(events):
    session = SMTPHarness(role="submission")
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<bob@example.org>")) == ["530 5.7.0"]
    check(events, session, command="MAIL", code=530, enhanced="5.7.0", reason="auth-required",
          role="submission")


def test_tls_required(events):
    session = SMTPHarness(role="submission", peer=REMOTE)
    session.ehlo()
    assert reply_codes(session.send(plain("bob@example.org", "secret"))) == ["538 5.7.11"]
    check(events, session, command="AUTH", code=538, enhanced="5.7.11", reason="tls-required",
          role="submission")


def test_sender_not_owned(events):
    session = SMTPHarness(role="submission", peer=LOOPBACK)
    session.ehlo()
    session.send(plain("bob@example.org", "secret"))
    assert reply_codes(session.command("MAIL FROM:<alice@example.org>")) == ["553 5.7.1"]
    check(events, session, command="MAIL", code=553, enhanced="5.7.1", reason="sender-not-owned",
          user="bob@example.org", role="submission", sender="alice@example.org")


def test_smtputf8_required(events):
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<jürgen@example.org>")) == ["553 5.6.7"]
    check(events, session, command="MAIL", code=553, enhanced="5.6.7",
          reason="smtputf8-required", sender="jürgen@example.org")


def test_too_many_recipients(events):
    session = in_transaction(config=make_config(limits={"max_recipients": 1}))
    assert reply_codes(session.command("RCPT TO:<alice@example.org>")) == ["452 4.5.3"]
    check(events, session, command="RCPT", code=452, enhanced="4.5.3",
          reason="too-many-recipients", recipient="alice@example.org")


def test_size_declared_at_mail(events):
    session = SMTPHarness(config=make_config(limits={"max_message_size": 100}))
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<a@remote.net> SIZE=101")) == ["552 5.3.4"]
    check(events, session, command="MAIL", code=552, enhanced="5.3.4", reason="size", size=101)


def message_refused(events, session, text: bytes, code: int, enhanced: str, reason: str):
    assert reply_codes(session.send(b"DATA\r\n" + text + b".\r\n")) == ["354", f"{code} {enhanced}"]
    (message,) = session.intake.messages
    event = check(events, session, command="DATA", code=code, enhanced=enhanced, reason=reason,
                  sender="a@remote.net", recipients=("bob@example.org",), id=message.envelope.id)
    assert message.envelope.id and event["size"] >= 0
    assert f"{message.envelope.id}: refused " in formatEvent(event)


def test_size_of_the_message(events):
    session = in_transaction(config=make_config(limits={"max_message_size": 100}))
    message_refused(events, session, b"x" * 200 + b"\r\n", 552, "5.3.4", "size")


def test_storage_at_mail(events):
    session = SMTPHarness()
    session.intake.room = False
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<a@remote.net>")) == ["452 4.3.1"]
    check(events, session, command="MAIL", code=452, enhanced="4.3.1", reason="storage")


def test_storage_at_the_end(events):
    session = in_transaction()
    session.intake.fail = True
    message_refused(events, session, b"Subject: x\r\n\r\nbody\r\n", 451, "4.3.0", "storage")


def test_line_length(events):
    session = in_transaction(config=make_config(limits={"max_text_line": 1000}))
    message_refused(events, session, b"x" * 1000 + b"\r\n", 500, "5.5.2", "line-length")


def test_bare_newline(events):
    session = in_transaction(config=make_config(smtp={"bare_newline": "reject"}))
    message_refused(events, session, b"Subject: x\n\nbody\r\n", 550, "5.5.2", "bare-newline")


def test_loop(events):
    session = in_transaction(config=make_config(smtp={"max_received_headers": 1}))
    message_refused(events, session, b"Received: a\r\nReceived: b\r\n\r\n", 554, "5.4.6", "loop")


def test_etrn_denied(events):
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("ETRN remote.net")) == ["459 4.7.1"]
    check(events, session, command="ETRN", code=459, enhanced="4.7.1", reason="etrn-denied",
          domain="remote.net")


# AUTH on the MX role is off by default (smtp.mx_auth).
MX_AUTH = {"mx_auth": True}


def test_auth_failed(events):
    session = SMTPHarness(peer=LOOPBACK, config=make_config(smtp=MX_AUTH))
    session.ehlo()
    session.send(plain("bob@example.org", "wrong"))
    session.clock.advance(60)
    assert reply_codes(session.read()) == ["535 5.7.8"]
    check(events, session, command="AUTH", code=535, enhanced="5.7.8", reason="auth-failed",
          name="smtp.auth_failed", user="bob@example.org", failures=1)
    assert refusals(events) == []


def test_rate_of_failed_logins(events):
    config = make_config(limits={"max_auth_failures_per_client": 1}, smtp=MX_AUTH)
    first = SMTPHarness(peer=LOOPBACK, config=config)
    first.ehlo()
    first.send(plain("bob@example.org", "wrong"))
    first.clock.advance(60)
    session = SMTPHarness(peer=LOOPBACK, factory=first.factory)
    session.ehlo()
    assert reply_codes(session.send(plain("bob@example.org", "secret"))) == ["454 4.7.0"]
    check(events, session, command="AUTH", code=454, enhanced="4.7.0", reason="rate",
          name="smtp.auth_throttled", user="bob@example.org")


def test_connection_limit(events):
    first = SMTPHarness(config=make_config(limits={"max_connections_per_client": 1}))
    second = SMTPHarness(factory=first.factory)
    assert reply_codes(second.greeting) == ["421 4.7.0"]
    check(events, second, command="CONNECT", code=421, enhanced="4.7.0",
          reason="connection-limit")


def test_too_many_errors(events):
    session = SMTPHarness(config=make_config(limits={"max_errors": 2}))
    session.ehlo()
    out = session.send("BOGUS\r\nBOGUS\r\n")
    assert reply_codes(out) == ["500 5.5.2", "500 5.5.2", "421 4.7.0"] and session.closed
    check(events, session, command="-", code=421, enhanced="4.7.0", reason="errors", errors=2)


@implementer(IConnectionHook, IEnvelopeHook, IMessageHook)
class Refusing:
    """
    A plugin that refuses at one stage.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def _verdict(self, stage):
        return Reject(550, "5.7.1", "Not wanted here") if stage == self.stage else None

    def connection(self, client):
        return self._verdict("connection")

    def sender(self, client, address):
        return self._verdict("sender")

    def recipient(self, client, sender, address):
        return self._verdict("recipient")

    def message(self, envelope, headers, body):
        return self._verdict("message")


@pytest.mark.parametrize("stage, command", [
    ("connection", "CONNECT"), ("sender", "MAIL"), ("recipient", "RCPT"), ("message", "DATA"),
])
def test_a_plugin_refusal_names_the_plugin(events, stage, command):
    hooks = Hooks([("Block list", Refusing(stage))])
    intake = HookedIntake(MemoryIntake(), hooks, Path(tempfile.mkdtemp()))
    session = SMTPHarness(hooks=hooks, intake=intake)
    if stage == "connection":
        assert reply_codes(session.greeting) == ["550 5.7.1"] and session.closed
    else:
        session.ehlo()
        out = session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                           "Subject: x\r\n\r\nbody\r\n.\r\n")
        assert "550 5.7.1" in reply_codes(out)
    check(events, session, command=command, code=550, enhanced="5.7.1",
          reason="plugin:block_list")


def test_a_timeout_is_logged_with_the_message_it_cut_short(events):
    session = in_transaction()
    session.send(b"DATA\r\nSubject: x\r\n")
    session.clock.advance(session.config.limits.smtp_data_timeout + 1)
    assert reply_codes(session.read()) == ["421 4.4.2"]
    [event] = refusals(events, "smtp.timeout")
    (message,) = session.intake.messages
    assert (event["client"], event["helo"], event["state"], event["id"]) == (
        "203.0.113.9", CLIENT, "data", message.envelope.id)
    assert refusals(events) == []  # no refusal: the client went quiet


# The spam defences' refusals (mailserver/defences/, the Rspamd plugin): the
# same event and metric as the server's own.


class OneListing:
    """
    A resolver that lists 203.0.113.9 (REMOTE) on bl.test.
    """

    def lookupAddress(self, name, timeout=None):
        from twisted.internet import defer
        from twisted.names import dns, error

        if name != "9.113.0.203.bl.test":
            return defer.fail(error.DNSNameError(name))
        record = dns.RRHeader(name.encode(), dns.A, dns.IN, 60, dns.Record_A("127.0.0.2"))
        return defer.succeed(([record], [], []))


def defended(tmp_path, role="smtp", limits=None, peer=REMOTE, **checks) -> SMTPHarness:
    """
    A session of a listener with the defences C{checks} and C{limits} turn
    on, on the harness's fake clock.
    """
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from mailserver.config import Checks
    from mailserver.defences import defence_hooks
    from mailserver.smtp import SMTPDependencies, SMTPFactory
    from mailserver.testing import FakeAccounts, make_portal

    checks.setdefault("skip_networks", ())
    config = make_config(checks=Checks(**checks), limits=limits or {})
    clock = MemoryReactorClock()
    defences, _ = defence_hooks(
        checks=config.checks, limits=config.limits, store_path=tmp_path / "defences.sqlite",
        resolver=OneListing(), reactor=clock,
        run=lambda operation, *args: defer.maybeDeferred(operation, *args),
    )
    factory = SMTPFactory(SMTPDependencies.for_listener(
        role=role, hostname=config.hostname, smtp=config.smtp, limits=config.limits,
        accounts=FakeAccounts(config, ["bob@example.org"]),
        portal=make_portal(**{"bob@example.org": "secret"}), intake=MemoryIntake(),
        tls_options=None, reactor=clock, hooks=Hooks(defences),
    ))
    session = SMTPHarness(factory=factory, peer=peer)
    session.clock = clock
    return session


def test_dnsbl(events, tmp_path):
    from mailserver.config.values import dnsbl_site

    session = defended(tmp_path, dnsbl=(dnsbl_site("bl.test"),))
    assert reply_codes(session.greeting) == ["554 5.7.1"] and session.closed
    event = check(events, session, command="CONNECT", code=554, enhanced="5.7.1", reason="dnsbl")
    assert "blocked using bl.test" in event["reply"]


def test_pregreet(events, tmp_path):
    session = defended(tmp_path, greet_delay=2.0)
    session.send(b"EHLO early.example\r\n")
    session.clock.advance(2.0)
    assert reply_codes(session.read()) == ["554 5.5.0"] and session.closed
    check(events, session, command="CONNECT", code=554, enhanced="5.5.0", reason="pregreet")


def test_greylist(events, tmp_path):
    session = defended(tmp_path, greylist=True, greylist_delay=60.0)
    session.ehlo()
    out = session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    assert reply_codes(out) == ["250 2.1.0", "451 4.7.1"]
    check(events, session, command="RCPT", code=451, enhanced="4.7.1", reason="greylist",
          sender="a@remote.net", recipient="bob@example.org")


def test_rate_of_submissions(events, tmp_path):
    session = defended(tmp_path, role="submission", peer=LOOPBACK,
                       limits={"submission_messages_per_hour": 1})
    session.ehlo()
    session.send(plain("bob@example.org", "secret"))
    out = session.send("MAIL FROM:<bob@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                       "Subject: one\r\n\r\nx\r\n.\r\n")
    assert reply_codes(out)[-1] == "250 2.0.0"
    assert reply_codes(session.command("MAIL FROM:<bob@example.org>")) == ["450 4.7.1"]
    check(events, session, command="MAIL", code=450, enhanced="4.7.1", reason="rate",
          role="submission", user="bob@example.org", sender="bob@example.org")


@implementer(IMessageHook)
class SpamScanner:
    """
    Refuses as the Rspamd plugin refuses GTUBE.
    """

    def message(self, envelope, headers, body):
        return Reject(550, "5.7.1", "Gtube pattern", reason="rspamd")


def test_rspamd(events):
    hooks = Hooks([("rspamd", SpamScanner())])
    session = in_transaction(hooks=hooks,
                             intake=HookedIntake(MemoryIntake(), hooks, Path(tempfile.mkdtemp())))
    out = session.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert reply_codes(out) == ["354", "550 5.7.1"]
    check(events, session, command="DATA", code=550, enhanced="5.7.1", reason="rspamd",
          reply="Gtube pattern", sender="a@remote.net", recipients=("bob@example.org",))


def test_client_text_is_one_printable_line_in_the_event(events):
    session = SMTPHarness()
    session.command("EHLO evil\u2028line\x85two")
    out = session.send("MAIL FROM:<a@remote.net> SMTPUTF8\r\n"
                       "RCPT TO:<x\u202egnp.exe@elsewhere.example>\r\n")
    assert reply_codes(out)[-1] == "554 5.7.1"
    [event] = refusals(events)
    assert (event["helo"], event["recipient"]) == ("evil?line?two", "x?gnp.exe@elsewhere.example")
    assert formatEvent(event).isprintable()
