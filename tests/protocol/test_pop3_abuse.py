"""
POP3 clients that try to cost us: trickling bytes, never reading replies,
guessing passwords over many connections.
"""

from __future__ import annotations

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from zope.interface import implementer

from mailserver.testing import REMOTE, FakeRealm, MemoryMaildirs, POP3Harness, make_pop3_config
from mailserver.wire.session import CLOSE_GRACE


@pytest.fixture
def store():
    maildirs = MemoryMaildirs()
    maildirs.deliver("bob@localhost", b"Subject: one\n\nHello\n", "1700000000.M1P1Q1.test")
    return maildirs


def test_a_command_trickled_in_a_byte_at_a_time_still_times_out(store):
    session = POP3Harness(store, config=make_pop3_config(limits={"pop3_idle_timeout": 60}))
    for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP":
        session.send(bytes([byte]))
        session.clock.advance(5)
        if session.closed:
            break
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n"
    assert session.closed and session.clock.seconds() == 60


def test_a_client_that_does_not_read_its_replies_is_not_answered_further(store):
    session = POP3Harness(store)
    session.login()
    producer = session.transport.producer
    producer.pauseProducing()  # the client's window is full
    assert session.send(b"LIST\r\n" * 500) == b""
    assert session.transport.producerState == "producing"
    assert session.send(b"UIDL\r\n" * 1000) == b""  # past what is read ahead
    assert session.transport.producerState == "paused"
    producer.resumeProducing()
    replies = drain(session)
    assert replies.count(b"+OK") == 1500 and replies.endswith(b".\r\n")
    assert session.transport.producerState == "producing"


def drain(session: POP3Harness) -> bytes:
    """
    Let the reactor take its turns; return what the session wrote.
    """
    out = session.take()
    while any(call.getTime() <= session.clock.seconds() for call in session.clock.getDelayedCalls()):
        session.clock.advance(0)
        out += session.take()
    return out


def test_one_clients_pipelined_flood_is_handled_a_turn_at_a_time(store):
    session = POP3Harness(store)
    session.login()
    first = session.send(b"NOOP\r\n" * 250)
    assert first.count(b"+OK") == 100
    assert session.transport.producerState == "paused"
    assert drain(session).count(b"+OK") == 150
    assert session.transport.producerState == "producing"


def test_a_client_that_never_reads_is_cut_off_after_the_close_grace(store):
    session = POP3Harness(store, config=make_pop3_config(limits={"pop3_idle_timeout": 10}))
    aborted = []
    session.transport.abortConnection = lambda: aborted.append(True)
    session.clock.advance(10)
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n" and session.closed
    session.clock.advance(CLOSE_GRACE)
    assert aborted == [True]


def test_failed_logins_count_per_address_across_sessions(store):
    config = make_pop3_config(
        limits={"auth_failure_delay": 1.0, "max_auth_failures_per_client": 3}
    )
    first = POP3Harness(store, config=config)
    delays = []
    for _ in range(3):
        session = POP3Harness(store, factory=first.factory)
        assert session.login(password="guess") == b""
        waited = 0.0
        while not session.take():
            session.clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 3.0]
    session = POP3Harness(store, factory=first.factory)
    refused = session.login()  # the right password, not even checked
    assert refused.startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    assert not session.closed
    session.clock.advance(config.limits.auth_failure_window)
    assert POP3Harness(store, factory=first.factory).login().startswith(b"+OK")


@implementer(ICredentialsChecker)
class HeldChecker:
    """
    A password checker whose answers the test gives, as a thread pool
    checking slowly would.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.checks: list[defer.Deferred] = []

    def requestAvatarId(self, credentials):
        self.checks.append(defer.Deferred())
        return self.checks[-1]


def test_logins_sent_at_once_get_no_more_checks_than_the_limit(store):
    config = make_pop3_config(limits={"auth_failure_delay": 0.0, "max_auth_failures_per_client": 3})
    checker = HeldChecker()
    first = POP3Harness(store, config=config, portal=Portal(FakeRealm(), [checker]))
    sessions = [POP3Harness(store, factory=first.factory) for _ in range(10)]
    answers = [session.login(password="guess") for session in sessions]
    # Three checks run; the other seven are refused without one.
    assert len(checker.checks) == 3
    assert answers[:3] == [b""] * 3
    assert all(a.startswith(b"-ERR [SYS/TEMP] Too many failed logins") for a in answers[3:])
    for check in checker.checks:
        check.errback(UnauthorizedLogin())
    first.clock.advance(0)
    assert [s.take() for s in sessions[:3]] == [b"-ERR [AUTH] Authentication failed.\r\n"] * 3
    assert sessions[3].login().startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    assert len(checker.checks) == 3


def test_a_login_that_succeeds_gives_its_place_back(store):
    config = make_pop3_config(limits={"max_auth_failures_per_client": 1})
    checker = HeldChecker()
    first = POP3Harness(store, config=config, portal=Portal(FakeRealm(), [checker]))
    second = POP3Harness(store, factory=first.factory)
    assert first.login() == b""
    assert second.login().startswith(b"-ERR [SYS/TEMP]")  # one check at a time
    checker.checks[0].callback(b"bob@localhost")
    assert first.take().startswith(b"+OK Logged in")
    assert second.login() == b""  # checked now
    assert len(checker.checks) == 2


def test_connections_over_the_caps_are_refused_at_the_greeting(store):
    config = make_pop3_config(limits={"max_connections_per_client": 2, "max_connections": 3})
    first = POP3Harness(store, config=config)
    second = POP3Harness(store, factory=first.factory)
    third = POP3Harness(store, factory=first.factory)
    assert third.greeting == (
        b"-ERR [SYS/TEMP] Too many connections from your address, try again later.\r\n"
    )
    assert third.closed and third.command("USER bob@localhost") == b""
    other = POP3Harness(store, factory=first.factory, peer=REMOTE)
    assert other.greeting.startswith(b"+OK")
    assert POP3Harness(store, factory=first.factory, peer=REMOTE).greeting == (
        b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    )
    third.drop()  # a refused connection held no place
    first.drop()
    assert POP3Harness(store, factory=first.factory).greeting.startswith(b"+OK")
    assert second.login().startswith(b"+OK")
