"""
POP3 clients that try to cost us: trickling bytes, never reading replies,
guessing passwords over many connections.
"""

from __future__ import annotations

import pytest

from tests.protocol.pop3_fakes import MemoryMaildirs, Session, make_config


@pytest.fixture
def store():
    maildirs = MemoryMaildirs()
    maildirs.deliver("bob@localhost", b"Subject: one\n\nHello\n", "1700000000.M1P1Q1.test")
    return maildirs


def test_a_command_trickled_in_a_byte_at_a_time_still_times_out(store):
    session = Session(store, config=make_config(limits={"pop3_idle_timeout": 60}))
    for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP":
        session.send(bytes([byte]))
        session.clock.advance(5)
        if session.closed:
            break
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n"
    assert session.closed and session.clock.seconds() == 60


def test_a_client_that_does_not_read_its_replies_is_not_answered_further(store):
    session = Session(store)
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


def drain(session: Session) -> bytes:
    """
    Let the reactor take its turns; return what the session wrote.
    """
    out = session.take()
    while any(call.getTime() <= session.clock.seconds() for call in session.clock.getDelayedCalls()):
        session.clock.advance(0)
        out += session.take()
    return out


def test_one_clients_pipelined_flood_is_handled_a_turn_at_a_time(store):
    session = Session(store)
    session.login()
    first = session.send(b"NOOP\r\n" * 250)
    assert first.count(b"+OK") == 100
    assert session.transport.producerState == "paused"
    assert drain(session).count(b"+OK") == 150
    assert session.transport.producerState == "producing"


def test_a_client_that_never_reads_is_cut_off_after_the_close_grace(store):
    import mailserver.pop3.protocol as pop3_protocol

    session = Session(store, config=make_config(limits={"pop3_idle_timeout": 10}))
    aborted = []
    session.transport.abortConnection = lambda: aborted.append(True)
    session.clock.advance(10)
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n" and session.closed
    session.clock.advance(pop3_protocol.CLOSE_GRACE)
    assert aborted == [True]


def test_failed_logins_count_per_address_across_sessions(store):
    config = make_config(
        limits={"auth_failure_delay": 1.0, "max_auth_failures_per_client": 3}
    )
    first = Session(store, config=config)
    delays = []
    for _ in range(3):
        session = Session(store, factory=first.factory)
        assert session.login(password="guess") == b""
        waited = 0.0
        while not session.take():
            session.clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 3.0]
    session = Session(store, factory=first.factory)
    refused = session.login()  # the right password, not even checked
    assert refused.startswith(b"-ERR [SYS/TEMP] Too many failed logins")
    assert not session.closed
    session.clock.advance(config.limits.auth_failure_window)
    assert Session(store, factory=first.factory).login().startswith(b"+OK")
