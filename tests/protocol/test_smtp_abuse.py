"""
Clients that try to cost us: trickling bytes to hold a session, never
reading replies, flooding input while a command runs, guessing passwords
over many connections.
"""

from base64 import b64encode

import dataclasses

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from zope.interface import implementer

from mailserver.smtp import SMTPFactory
from mailserver.testing import LOOPBACK, FakeRealm, SMTPHarness, make_config, reply_codes


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64encode(f"\0{user}\0{password}".encode()).decode() + "\r\n"


def test_a_command_trickled_in_a_byte_at_a_time_still_times_out():
    session = SMTPHarness(config=make_config(limits={"smtp_command_timeout": 60}))
    for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP":
        session.send(bytes([byte]))
        session.clock.advance(5)
        if session.closed:
            break
    assert reply_codes(session.read()) == ["421 4.4.2"]
    assert session.closed
    assert session.clock.seconds() == 60  # no byte bought more time


def test_an_endless_command_line_does_not_hold_the_session():
    session = SMTPHarness(config=make_config(limits={"smtp_command_timeout": 60}))
    out = b""
    for _ in range(30):  # 600 octets every 5 s, never a line end
        out += session.send(b"x" * 600)
        session.clock.advance(5)
        if session.closed:
            break
    out += session.read()
    assert reply_codes(out) == ["500 5.5.2", "421 4.4.2"]
    assert session.clock.seconds() == 60  # the refused line bought no time


def test_message_text_must_keep_a_minimum_rate():
    config = make_config(limits={"smtp_data_timeout": 100, "min_data_rate": 100})
    session = SMTPHarness(config=config)
    session.ehlo()
    session.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    session.read()
    # 10 octets every 5 s is 2 octets/s: each piece earns 0.1 s, not 5.
    while not session.closed:
        session.send(b"x" * 8 + b"\r\n")
        session.clock.advance(5)
    assert reply_codes(session.read()) == ["421 4.4.2"]
    assert 100 <= session.clock.seconds() <= 110
    assert session.intake.messages[0].aborted


def test_message_text_at_a_fair_rate_is_never_cut_off():
    config = make_config(limits={"smtp_data_timeout": 100, "min_data_rate": 100})
    session = SMTPHarness(config=config)
    session.ehlo()
    session.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    for _ in range(100):  # 500 s in all, at 200 octets/s
        session.send(b"y" * 998 + b"\r\n")
        session.clock.advance(5)
    assert not session.closed
    assert reply_codes(session.send(b".\r\n")) == ["250 2.0.0"]


def drain(session: SMTPHarness) -> bytes:
    """
    Let the reactor take its turns until the session has nothing left to
    do; return what it wrote.
    """
    out = session.read()
    for _ in range(10_000):
        if not session.clock.getDelayedCalls() or all(
            call.getTime() > session.clock.seconds() for call in session.clock.getDelayedCalls()
        ):
            break
        session.clock.advance(0)
        out += session.read()
    return out


UNLIMITED_JUNK = make_config(limits={"max_junk_commands": 10**9})


def test_a_client_that_does_not_read_its_replies_is_not_answered_further():
    session = SMTPHarness(peer=LOOPBACK, config=UNLIMITED_JUNK)
    producer = session.transport.producer
    assert producer is not None  # the session is the transport's producer
    producer.pauseProducing()  # the transport: the client's window is full
    assert session.send(b"NOOP\r\n" * 10) == b""
    assert session.transport.producerState == "producing"  # still reading, a little
    flood = b"NOOP\r\n" * 20_000  # 120 KiB more while nothing is answered
    assert session.send(flood) == b""
    assert session.transport.producerState == "paused"  # no longer reading
    producer.resumeProducing()  # the client caught up
    assert reply_codes(drain(session)) == ["250 2.0.0"] * 20_010
    assert session.transport.producerState == "producing"


def test_input_sent_while_a_message_is_stored_stops_the_reading():
    session = SMTPHarness(config=UNLIMITED_JUNK)
    session.intake.hold = True
    session.ehlo()
    session.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nhi\r\n.\r\n")
    assert session.send(b"NOOP\r\n" * 20_000) == b""
    assert session.transport.producerState == "paused"
    session.intake.pending[0].callback(None)
    assert reply_codes(drain(session)) == ["250 2.0.0"] * 20_001
    assert session.transport.producerState == "producing"


def test_one_clients_pipelined_flood_is_handled_a_turn_at_a_time():
    session = SMTPHarness(config=UNLIMITED_JUNK)
    first_turn = session.send(b"NOOP\r\n" * 1000)
    assert len(reply_codes(first_turn)) == 100  # the other sessions go next
    assert session.transport.producerState == "paused"  # nothing more read meanwhile
    assert reply_codes(drain(session)) == ["250 2.0.0"] * 900
    assert session.transport.producerState == "producing"


def test_a_flood_of_junk_commands_ends_with_421():
    session = SMTPHarness(config=make_config(limits={"max_junk_commands": 5, "max_errors": 3}))
    answers = reply_codes(session.send(b"NOOP\r\n" * 5 + b"RSET\r\n" * 2 + b"VRFY x\r\nNOOP\r\n"))
    assert answers == ["250 2.0.0"] * 7 + ["421 4.7.0"]
    assert session.closed


def test_a_client_that_never_reads_is_cut_off_after_the_close_grace():
    from mailserver.wire.session import CLOSE_GRACE

    session = SMTPHarness(config=make_config(limits={"smtp_command_timeout": 10}))
    aborted = []
    session.transport.abortConnection = lambda: aborted.append(True)
    session.clock.advance(10)
    assert reply_codes(session.read()) == ["421 4.4.2"] and session.closed
    # The transport could not hand the 421 over: the connection is still up.
    session.clock.advance(CLOSE_GRACE - 0.1)
    assert aborted == []
    session.clock.advance(0.1)
    assert aborted == [True]


def test_a_normal_close_leaves_no_timer_behind():
    session = SMTPHarness()
    session.command("QUIT")
    session.lose()
    assert session.clock.getDelayedCalls() == []


def test_failed_logins_count_per_address_across_sessions():
    config = make_config(
        limits={"auth_failure_delay": 1.0, "max_auth_failures_per_client": 4, "max_auth_failures": 10}
    )
    first = SMTPHarness(peer=LOOPBACK, config=config, role="submission")
    factory = first.factory
    delays = []
    for _ in range(4):
        # A new connection for every guess, as a guesser would.
        session = SMTPHarness(peer=LOOPBACK, factory=factory)
        session.ehlo()
        assert session.send(plain("bob@example.org", "guess")) == b""
        waited = 0.0
        while not session.read():
            session.clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 3.0, 4.0]  # growing with the address's failures
    # Now even the right password is refused, unchecked, for a while.
    session = SMTPHarness(peer=LOOPBACK, factory=factory)
    session.ehlo()
    assert reply_codes(session.send(plain("bob@example.org", "secret"))) == ["454 4.7.0"]
    assert not session.closed  # the session may still send mail
    session.clock.advance(config.limits.auth_failure_window)  # the failures age out
    session = SMTPHarness(peer=LOOPBACK, factory=factory)
    session.ehlo()
    assert reply_codes(session.send(plain("bob@example.org", "secret"))) == ["235 2.7.0"]


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


def test_logins_sent_at_once_get_no_more_checks_than_the_limit():
    config = make_config(
        limits={"auth_failure_delay": 0.0, "max_auth_failures_per_client": 3}
    )
    checker = HeldChecker()
    first = SMTPHarness(peer=LOOPBACK, config=config, role="submission")
    factory = SMTPFactory(dataclasses.replace(
        first.factory.dependencies, portal=Portal(FakeRealm(), [checker])
    ))
    sessions = [SMTPHarness(peer=LOOPBACK, factory=factory) for _ in range(10)]
    answers = []
    for session in sessions:
        session.ehlo()
        answers.append(reply_codes(session.send(plain("bob@example.org", "guess"))))
    # Three checks run; the other seven are refused without one.
    assert len(checker.checks) == 3
    assert answers == [[]] * 3 + [["454 4.7.0"]] * 7
    for check in checker.checks:
        check.errback(UnauthorizedLogin())
    first.clock.advance(0)
    assert [reply_codes(s.read()) for s in sessions[:3]] == [["535 5.7.8"]] * 3
    assert reply_codes(sessions[3].send(plain("bob@example.org", "secret"))) == ["454 4.7.0"]
    assert len(checker.checks) == 3
