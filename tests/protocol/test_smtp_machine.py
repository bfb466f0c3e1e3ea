"""
The SMTP session as a pure state machine: a whole session driven with no
transport at all, and a check that no handler ever does I/O when the glue
drives one over a transport.
"""

from base64 import b64encode

import pytest
from twisted.internet.task import Clock

from mailserver.smtp import replies as R
from mailserver.smtp import session as session_module
from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.grammar import parse_command
from mailserver.smtp.session import SMTPSession
from mailserver.smtp.state import Connection, State
from mailserver.testing import (
    LOOPBACK,
    FakeAccounts,
    MemoryIntake,
    SMTPHarness,
    TLSStringTransport,
    make_config,
    make_portal,
    reply_codes,
)
from mailserver.wire.effects import CLOSE, Await, Login
from mailserver.wire.login import LoggedIn, Logins
from mailserver.wire.reply import Reply


def b64(text: str) -> str:
    return b64encode(text.encode()).decode()


def machine(role: str = "submission") -> tuple[SMTPSession, MemoryIntake, SMTPDependencies]:
    config = make_config()
    intake = MemoryIntake()
    dependencies = SMTPDependencies.for_listener(
        role=role,
        hostname=config.hostname,
        smtp=config.smtp,
        limits=config.limits,
        accounts=FakeAccounts(config, ["bob@example.org", "alice@example.org"]),
        portal=make_portal(**{"bob@example.org": "secret"}),
        intake=intake,
        tls_options=None,
        reactor=Clock(),
    )
    connection = Connection(address="192.0.2.7", port=4321, loopback=False)
    return SMTPSession(dependencies, connection, tls=True), intake, dependencies


def command(session: SMTPSession, line: str):
    return session.command(parse_command(line.encode()))


def fired(deferred):
    results = []
    deferred.addBoth(results.append)
    (result,) = results
    return result


def test_a_whole_session_without_a_transport():
    session, intake, dependencies = machine()
    assert session.greet() == Reply(220, "", ("mx.example.org ESMTP mailserver",))
    assert session.state is State.START

    ehlo = command(session, "EHLO client.example.net")
    assert ehlo.code == 250 and "AUTH PLAIN LOGIN" in ehlo.lines and "STARTTLS" not in ehlo.lines
    assert session.state is State.READY

    # AUTH asks for a login; the throttled check is the glue's (here: by
    # hand), and its outcome is told to the session.
    login = command(session, "AUTH PLAIN " + b64("\0bob@example.org\0secret"))
    assert login == Login(b"bob@example.org", b"secret")
    logins = Logins(dependencies.portal, dependencies.login_throttle, max_failures=3)
    outcome = fired(logins.attempt("192.0.2.7", login.username, login.password))
    assert isinstance(outcome, LoggedIn)
    assert session.logged_in(outcome.avatar.address, outcome.logout) == R.AUTH_SUCCESSFUL

    assert command(session, "MAIL FROM:<bob@example.org>") == R.SENDER_OK
    assert session.state is State.MAIL
    assert command(session, "RCPT TO:<alice@example.org>") == R.RECIPIENT_OK
    assert command(session, "DATA") == R.START_MAIL_INPUT
    assert session.state is State.DATA
    assert session.message_text(b"Subject: hi\r\n\r\n..dotted\r\n") is None
    assert session.message_text(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    stored = session.end_of_message()
    assert isinstance(stored, Await) and session.state is State.READY
    answer = stored.then(fired(stored.deferred))
    (message,) = intake.finished
    message_id = message.envelope.id
    assert answer.code == 250 and answer.lines == (f"Ok: queued as {message_id}",)
    assert f"with ESMTPSA id {message_id}".encode() in message.data
    # Submission completes the header (RFC 6409 8.2, 8.3).
    assert message.body == (
        b"Subject: hi\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n"
        b"Message-ID: <" + message_id.encode() + b"@mx.example.org>\r\n\r\n.dotted\r\n"
    )
    assert message.envelope.authenticated == "bob@example.org"
    assert b"with ESMTPSA" in message.data and b"(using TLS)" not in message.data
    # One id for the Received field and the envelope; TLS without a handle
    # to ask is "TLS", its cipher unknown.
    assert f"with ESMTPSA id {message.envelope.id}\r\n".encode() in message.data
    assert (message.envelope.tls_version, message.envelope.tls_cipher) == ("TLS", None)

    assert command(session, "QUIT") == (R.BYE, CLOSE)


def test_the_sequence_table_refuses_what_is_out_of_order():
    session, _, _ = machine(role="smtp")
    assert command(session, "MAIL FROM:<a@b.c>") == R.NEED_HELO
    assert command(session, "RCPT TO:<bob@example.org>") == R.NEED_MAIL
    assert command(session, "AUTH PLAIN") == R.AUTH_NOT_OFFERED  # by the MX role, by default
    assert command(machine()[0], "AUTH PLAIN") == R.NEED_EHLO
    command(session, "EHLO c")
    command(session, "MAIL FROM:<a@b.c>")
    assert command(session, "MAIL FROM:<a@b.c>") == R.NESTED_MAIL
    assert command(session, "ETRN remote.net") == R.IN_TRANSACTION
    assert command(session, "FROB") == R.UNKNOWN_COMMAND
    assert session.state is State.MAIL


class Tripwire(TLSStringTransport):
    """
    A transport that fails when a session handler is running while it is
    asked to do anything (write, close, start TLS, flow control).
    """

    running: str | None = None

    def _check(self, what: str) -> None:
        if Tripwire.running is not None:
            raise AssertionError(f"{Tripwire.running} called transport.{what}")

    def write(self, data):
        self._check("write")
        super().write(data)

    def writeSequence(self, data):
        self._check("writeSequence")
        super().writeSequence(data)

    def loseConnection(self):
        self._check("loseConnection")
        super().loseConnection()

    def abortConnection(self):
        self._check("abortConnection")
        super().abortConnection()

    def startTLS(self, options):
        self._check("startTLS")
        super().startTLS(options)

    def registerProducer(self, producer, streaming):
        self._check("registerProducer")
        super().registerProducer(producer, streaming)

    def unregisterProducer(self):
        self._check("unregisterProducer")
        super().unregisterProducer()

    def pauseProducing(self):
        self._check("pauseProducing")
        super().pauseProducing()

    def resumeProducing(self):
        self._check("resumeProducing")
        super().resumeProducing()


def watched(name, handler):
    def run(*args, **kwargs):
        Tripwire.running = name
        try:
            return handler(*args, **kwargs)
        finally:
            Tripwire.running = None

    return run


# What the glue calls on the session besides the command table.
ENTRY_POINTS = [
    "greet", "_greeting", "sasl_response", "logged_in", "line_too_long", "message_text",
    "end_of_message", "_stored", "chunk_text", "end_of_chunk",
]


@pytest.fixture
def tripwire(monkeypatch):
    for state, table in session_module._COMMANDS.items():
        for verb, handler in table.items():
            if callable(handler):
                monkeypatch.setitem(table, verb, watched(f"{state.label} {verb}", handler))
    for name in ENTRY_POINTS:
        monkeypatch.setattr(SMTPSession, name, watched(name, getattr(SMTPSession, name)))
    monkeypatch.setattr("mailserver.testing.TLSStringTransport", Tripwire)


class FakeRunner:
    def flush(self, domain):
        return 2


def test_no_handler_calls_the_transport(tripwire):
    session = SMTPHarness(
        peer=LOOPBACK, role="submission", tls_options=object(), queue_runner=FakeRunner()
    )
    assert isinstance(session.transport, Tripwire)
    script = [
        ("EHLO c", "250"), ("HELP", "214 2.0.0"), ("NOOP", "250 2.0.0"), ("VRFY bob", "252 2.5.0"),
        ("EXPN list", "502 5.5.1"), ("ETRN remote.net", "253 2.0.0"), ("FROB", "500 5.5.2"),
        ("AUTH LOGIN", "334"), (b64("bob@example.org"), "334"), (b64("secret"), "235 2.7.0"),
        ("MAIL FROM:<bob@example.org>", "250 2.1.0"), ("RCPT TO:<alice@example.org>", "250 2.1.5"),
        ("DATA", "354"), ("Subject: x\r\n\r\nbody\r\n.", "250 2.0.0"),
        ("MAIL FROM:<bob@example.org>", "250 2.1.0"), ("RCPT TO:<x@remote.net>", "250 2.1.5"),
        ("BDAT 5\r\nhel", "250 2.0.0"), ("BDAT 0 LAST", "250 2.0.0"), ("RSET", "250 2.0.0"),
        ("STARTTLS", "220 2.0.0"), ("EHLO c", "250"), ("QUIT", "221 2.0.0"),
    ]
    for line, expected in script:
        assert reply_codes(session.command(line)) == [expected], line
    assert session.transport.tls_started_with is not None
    assert session.closed
    assert len(session.intake.finished) == 2
    session.lose()


def test_the_tripwire_catches_a_handler_that_writes(tripwire, monkeypatch):
    session = SMTPHarness()

    def noisy(self, argument):
        session.transport.write(b"250 sneaky\r\n")
        return R.OK

    monkeypatch.setitem(session_module._COMMANDS[State.START], "NOOP", watched("NOOP", noisy))
    with pytest.raises(AssertionError, match="NOOP called transport.write"):
        session.command("NOOP")
