"""
The POP3 session as a pure state machine: a whole session driven with no
transport at all, and a check that no session code ever does I/O when the
glue drives one over a transport.
"""

import dataclasses
import sys
from base64 import b64encode

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver.login_throttle import throttle_for
from mailserver.pop3 import POP3Dependencies
from mailserver.pop3 import responses as R
from mailserver.pop3 import session as session_module
from mailserver.pop3.responses import Response, challenge, err, ok
from mailserver.pop3.retrieval import Retrieve
from mailserver.pop3.session import POP3Session, parse_command
from mailserver.pop3.state import Connection, State
from mailserver.pop3.storage import read_messages
from mailserver.testing import (
    REMOTE,
    FakeRealm,
    MemoryMaildirs,
    POP3Harness,
    TLSStringTransport,
    make_pop3_config,
    make_portal,
)
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login
from mailserver.wire.login import LoggedIn, Logins

FIRST = b"Subject: one\n\n.dot\nbody\n"
SECOND = b"Subject: two\n\nline 1\nline 2\n"


def machine(**pop3) -> tuple[POP3Session, MemoryMaildirs, POP3Dependencies, FakeRealm]:
    store = MemoryMaildirs()
    store.deliver("bob@localhost", FIRST, "1700000000.M1P1Q1.test")
    store.deliver("bob@localhost", SECOND, "1700000001.M2P1Q1.test")
    realm = FakeRealm()
    config = make_pop3_config(**pop3)
    clock = Clock()
    dependencies = POP3Dependencies.for_listener(
        hostname=config.hostname,
        pop3=config.pop3,
        limits=config.limits,
        portal=make_portal(realm, **{"bob@localhost": "secret"}),
        mailboxes=store,
        login_throttle=throttle_for(config.limits, clock),
        tls_options=None,
        reactor=clock,
        run_blocking=defer.maybeDeferred,
        run_in_slices=lambda steps: defer.maybeDeferred(list, steps),
    )
    connection = Connection(address="192.0.2.7", client="192.0.2.7:4321", loopback=False)
    return POP3Session(dependencies, connection, tls=True), store, dependencies, realm


def command(session: POP3Session, line: str):
    return session.command(parse_command(line.encode()))


def fired(deferred):
    results = []
    deferred.addBoth(results.append)
    (result,) = results
    return result


def retrieved(effect: Retrieve) -> bytes:
    """
    Carry out a L{Retrieve} as the glue does, by hand: read, encode, tell.
    """
    (data,) = read_messages([(effect.mailbox, effect.message)])
    wire = effect.status.render() + effect.encoder.encode(data) + effect.encoder.terminator()
    assert effect.then(len(wire)) is None
    return wire


def test_a_whole_session_without_a_transport():
    session, store, dependencies, realm = machine()
    assert session.greet() == ok("pop.test POP3 server ready.")
    assert session.state is State.AUTHORIZATION

    capa = command(session, "CAPA")
    assert capa.positive and "USER" in capa.lines and "STLS" not in capa.lines
    assert command(session, "USER bob@localhost") == R.OKAY
    login = command(session, "PASS secret")
    assert login == Login(b"bob@localhost", b"secret")
    # The throttled check is the glue's (here: by hand); the session is
    # told its outcome and opens the mailbox.
    logins = Logins(dependencies.portal, dependencies.login_throttle, max_failures=3)
    outcome = fired(logins.attempt("192.0.2.7", login.username, login.password))
    assert isinstance(outcome, LoggedIn)
    opening = session.logged_in(outcome.avatar.address, outcome.logout)
    assert isinstance(opening, Await)
    assert opening.then(fired(opening.deferred)) == ok("Logged in: 2 messages (60 octets).")
    assert session.state is State.TRANSACTION and store.locked == {"bob@localhost"}

    assert command(session, "STAT") == ok("2 60")
    assert command(session, "LIST") == ok("2 messages (60 octets)", lines=("1 28", "2 32"))
    assert command(session, "UIDL 2") == ok("2 1700000001.M2P1Q1.test")

    retr = command(session, "RETR 1")
    assert isinstance(retr, Retrieve) and retr.status == ok("28 octets")
    assert retrieved(retr) == b"+OK 28 octets\r\nSubject: one\r\n\r\n..dot\r\nbody\r\n.\r\n"
    top = command(session, "TOP 2 1")
    assert retrieved(top) == b"+OK\r\nSubject: two\r\n\r\nline 1\r\n.\r\n"
    assert command(session, "DELE 2") == ok("Message 2 marked to be deleted.")
    assert command(session, "RETR 2") == err("Message 2 is deleted.")

    quitting = command(session, "QUIT")
    assert isinstance(quitting, Await) and session.state is State.UPDATE
    assert quitting.then(fired(quitting.deferred)) == (
        ok("Logging out, 1 messages deleted."), CLOSE,
    )
    assert store.deletions == [("bob@localhost", ["1700000001.M2P1Q1.test"])]
    assert store.message("bob@localhost", "1700000000.M1P1Q1.test").seen  # RETR, not TOP
    assert store.locked == set()
    session.end()
    assert realm.logouts == 1 and session.state is State.CLOSED


def test_sasl_and_stls_without_a_transport():
    session, _, _, _ = machine()
    session.tls = False
    assert command(session, "USER bob@localhost") == R.PLAINTEXT_REFUSED
    session.deps = dataclasses.replace(session.deps, tls_options=object())
    assert command(session, "STLS") == (ok("Begin TLS negotiation."), START_TLS)
    assert session.tls and command(session, "STLS") == err("TLS is already active.")
    assert command(session, "AUTH LOGIN") == challenge(b"Username:")
    assert session.state is State.SASL
    assert session.sasl_response(b64encode(b"bob@localhost")) == challenge(b"Password:")
    assert session.sasl_response(b64encode(b"secret")) == Login(b"bob@localhost", b"secret")
    assert session.state is State.AUTHORIZATION
    assert command(session, "AUTH PLAIN") == challenge(b"")
    assert session.line_too_long() == R.LINE_TOO_LONG  # ends the exchange
    assert session.state is State.AUTHORIZATION and session.sasl is None


def test_the_sequence_table_refuses_what_is_out_of_order():
    session, _, _, _ = machine()
    assert command(session, "STAT") == err("STAT is not valid in this state.")
    assert command(session, "RETR 1") == err("RETR is not valid in this state.")
    assert command(session, "FROB") == R.UNKNOWN_COMMAND
    assert command(session, "") == R.UNKNOWN_COMMAND
    assert command(session, "QUIT") == (ok("Logging out."), CLOSE)
    assert session.errors == 4


def test_too_many_bad_commands_close_the_session():
    session, _, _, _ = machine()
    results = [command(session, "FROB") for _ in range(20)]
    assert results[:19] == [R.UNKNOWN_COMMAND] * 19
    assert results[19] == (R.UNKNOWN_COMMAND, R.TOO_MANY_ERRORS, CLOSE)


def test_responses_render_as_pop3_puts_them():
    assert ok().render() == b"+OK\r\n"
    assert err("Nope.", "SYS/TEMP").render() == b"-ERR [SYS/TEMP] Nope.\r\n"
    assert challenge(b"").render() == b"+ \r\n"
    assert ok("2 listed", lines=("a", ".b", "")).render() == b"+OK 2 listed\r\na\r\n..b\r\n\r\n.\r\n"
    assert isinstance(R.AUTH_FAILED, Response) and not R.AUTH_FAILED.positive


class Tripwire(TLSStringTransport):
    """
    A transport that fails when it is asked to do anything (write, close,
    start TLS, flow control) while code of the session module is running:
    only the glue may do I/O.
    """

    def _check(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename == session_module.__file__:
                raise AssertionError(f"{frame.f_code.co_name} called transport.{what}")
            frame = frame.f_back

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

    def stopProducing(self):
        self._check("stopProducing")
        super().stopProducing()


@pytest.fixture
def tripwire(monkeypatch):
    monkeypatch.setattr("mailserver.testing.TLSStringTransport", Tripwire)


def codes(output: bytes) -> list[bytes]:
    """
    The status of each response line (+OK, -ERR, +), not the bodies.
    """
    return [line.split(b" ")[0] for line in output.split(b"\r\n") if line[:1] in (b"+", b"-")]


def test_no_session_code_calls_the_transport(tripwire):
    store = MemoryMaildirs()
    store.deliver("bob@localhost", FIRST)
    store.deliver("bob@localhost", b"Subject: big\n\n" + b"x" * 300_000 + b"\n")
    session = POP3Harness(store, peer=REMOTE, tls_options=object())
    assert isinstance(session.transport, Tripwire)
    script = [
        ("CAPA", [b"+OK"]), ("FROB", [b"-ERR"]), ("STAT", [b"-ERR"]), ("USER x", [b"-ERR"]),
        ("STLS", [b"+OK"]), ("AUTH LOGIN", [b"+"]), (b64encode(b"bob@localhost").decode(), [b"+"]),
        (b64encode(b"secret").decode(), [b"+OK"]), ("STAT", [b"+OK"]), ("LIST", [b"+OK"]),
        ("UIDL", [b"+OK"]), ("RETR 1", [b"+OK"]), ("TOP 1 0", [b"+OK"]), ("RETR 2", [b"+OK"]),
        ("RETR 9", [b"-ERR"]), ("DELE 1", [b"+OK"]), ("RSET", [b"+OK"]), ("DELE 2", [b"+OK"]),
        ("NOOP", [b"+OK"]), ("QUIT", [b"+OK"]),
    ]
    for line, expected in script:
        assert codes(session.command(line)) == expected, line
    assert session.transport.tls_started_with is not None
    assert session.closed
    assert store.deletions == [("bob@localhost", ["1700000000.M1P1Q1.test"])]
    session.drop()


def test_the_tripwire_catches_session_code_that_writes(tripwire, monkeypatch):
    session = POP3Harness(MemoryMaildirs())

    def noisy(self, argument):
        session.transport.write(b"+OK sneaky\r\n")
        return R.OKAY

    monkeypatch.setitem(session_module._COMMANDS[State.AUTHORIZATION], "CAPA", noisy)
    with pytest.raises(AssertionError, match="called transport.write"):
        session.command("CAPA")
