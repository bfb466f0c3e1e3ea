"""
The POP3 TRANSACTION and UPDATE states, bad input, pipelining and timeouts,
driven through a StringTransport with exact bytes.
"""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from mailserver.pop3.transfer import MessageTransfer
from mailserver.testing import MemoryMaildirs, POP3Harness, make_pop3_config

FIRST = b"From: a@x\nSubject: one\n\nHello\n.\n..two\n.lead\n"
SECOND = b"Subject: two\n\nline 1\nline 2\nline 3\n"
FIRST_WIRE = b"From: a@x\r\nSubject: one\r\n\r\nHello\r\n..\r\n...two\r\n..lead\r\n"
UID1 = "1700000000.M1P1Q1.test"
UID2 = "1700000001.M2P1Q1.test"


@pytest.fixture
def store() -> MemoryMaildirs:
    store = MemoryMaildirs()
    store.deliver("bob@localhost", FIRST, UID1)
    store.deliver("bob@localhost", SECOND, UID2)
    return store


@pytest.fixture
def session(store) -> POP3Harness:
    session = POP3Harness(store)
    assert session.login() == b"+OK Logged in: 2 messages (91 octets).\r\n"
    return session


def test_greeting_has_no_apop_timestamp():
    session = POP3Harness(MemoryMaildirs())
    assert session.greeting == b"+OK pop.test POP3 server ready.\r\n"


def test_sizes_are_crlf_octets(session):
    assert len(FIRST) + FIRST.count(b"\n") == 51
    assert session.command("STAT") == b"+OK 2 91\r\n"
    assert session.command("LIST") == b"+OK 2 messages (91 octets)\r\n1 51\r\n2 40\r\n.\r\n"
    assert session.command("LIST 2") == b"+OK 2 40\r\n"


def test_uidl_single_and_all(session):
    assert session.command("UIDL 1") == f"+OK 1 {UID1}\r\n".encode()
    assert session.command("UIDL") == (
        f"+OK 2 messages (91 octets)\r\n1 {UID1}\r\n2 {UID2}\r\n.\r\n".encode()
    )


def test_retr_sends_exact_octets_stuffed_and_marks_seen(session, store):
    reply = session.command("RETR 1")
    assert reply == b"+OK 51 octets\r\n" + FIRST_WIRE + b".\r\n"
    assert len(FIRST_WIRE) == 51 + 3  # three stuffed dots, not counted
    assert session.command("RETR 2").startswith(b"+OK 40 octets\r\n")
    assert not store.message("bob@localhost", UID2).seen  # marked at QUIT
    assert session.command("DELE 1") == b"+OK Message 1 marked to be deleted.\r\n"
    session.command("QUIT")
    assert store.deletions == [("bob@localhost", [UID1])]
    assert store.message("bob@localhost", UID2).seen


def test_without_quit_nothing_is_marked_seen(session, store):
    assert session.command("RETR 2").startswith(b"+OK 40 octets\r\n")
    session.drop()
    assert not store.message("bob@localhost", UID2).seen


def test_top_does_not_mark_seen(session, store):
    assert session.command("TOP 2 0") == b"+OK\r\nSubject: two\r\n\r\n.\r\n"
    assert session.command("TOP 2 2") == b"+OK\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\n.\r\n"
    assert session.command("TOP 1 2") == (
        b"+OK\r\nFrom: a@x\r\nSubject: one\r\n\r\nHello\r\n..\r\n.\r\n"
    )
    assert not store.message("bob@localhost", UID2).seen


def test_dele_then_rset_keeps_everything(session, store):
    assert session.command("DELE 1") == b"+OK Message 1 marked to be deleted.\r\n"
    assert session.command("STAT") == b"+OK 1 40\r\n"
    assert session.command("LIST") == b"+OK 1 messages (40 octets)\r\n2 40\r\n.\r\n"
    assert session.command("RSET") == b"+OK 2 messages (91 octets).\r\n"
    assert session.command("RETR 1").startswith(b"+OK 51 octets\r\n")
    assert session.command("QUIT") == b"+OK Logging out, 0 messages deleted.\r\n"
    assert store.deletions == []
    assert len(store.boxes["bob@localhost"]) == 2


def test_deleted_message_refused_by_every_command(session):
    session.command("DELE 2")
    for command in ("RETR 2", "TOP 2 1", "LIST 2", "UIDL 2", "DELE 2"):
        assert session.command(command) == b"-ERR Message 2 is deleted.\r\n", command
    # Numbers stay as they were: message 1 is still 1.
    assert session.command("LIST 1") == b"+OK 1 51\r\n"


def test_dele_then_quit_deletes_and_unlocks(session, store):
    session.command("DELE 2")
    session.command("DELE 1")
    assert session.command("QUIT") == b"+OK Logging out, 2 messages deleted.\r\n"
    assert session.closed
    assert store.deletions == [("bob@localhost", [UID1, UID2])]
    assert store.locked == set()
    session.drop()
    assert store.deletions == [("bob@localhost", [UID1, UID2])]


def test_dropped_connection_deletes_nothing_and_unlocks(session, store):
    session.command("DELE 1")
    assert store.locked == {"bob@localhost"}
    session.drop()
    assert store.deletions == []
    assert store.locked == set()
    assert session.realm.logouts == 1


def test_quit_when_delete_fails_says_so(session, store):
    session.command("DELE 1")
    store.fail_delete = True
    reply = session.command("QUIT")
    assert reply == b"-ERR [SYS/TEMP] Some deleted messages could not be removed.\r\n"
    assert store.locked == set()
    assert session.closed


def test_noop_and_capa_in_transaction(session):
    assert session.command("NOOP") == b"+OK\r\n"
    capabilities = session.command("CAPA").split(b"\r\n")
    assert b"STLS" not in capabilities and b"TOP" in capabilities


@pytest.mark.parametrize(
    "command, reply",
    [
        ("RETR abc", b"-ERR Invalid message number: abc\r\n"),
        ("RETR 0", b"-ERR There's no message 0.\r\n"),
        ("RETR 99999", b"-ERR There's no message 99999.\r\n"),
        ("RETR", b"-ERR Invalid message number: \r\n"),
        ("RETR +1", b"-ERR Invalid message number: +1\r\n"),
        ("LIST -1", b"-ERR Invalid message number: -1\r\n"),
        ("UIDL x", b"-ERR Invalid message number: x\r\n"),
        ("DELE 3", b"-ERR There's no message 3.\r\n"),
        ("TOP 1", b"-ERR TOP needs a message number and a number of lines.\r\n"),
        ("TOP 1 -1", b"-ERR Invalid number of lines.\r\n"),
        ("TOP 9 1", b"-ERR There's no message 9.\r\n"),
        ("XYZZY", b"-ERR Unknown command.\r\n"),
        ("", b"-ERR Unknown command.\r\n"),
        ("USER bob@localhost", b"-ERR USER is not valid in this state.\r\n"),
        ("PASS x", b"-ERR PASS is not valid in this state.\r\n"),
        ("STLS", b"-ERR STLS is not valid in this state.\r\n"),
        ("AUTH PLAIN", b"-ERR AUTH is not valid in this state.\r\n"),
    ],
)
def test_bad_input_in_transaction_is_refused_and_session_goes_on(session, command, reply):
    assert session.command(command) == reply
    assert not session.closed
    assert session.command("STAT") == b"+OK 2 91\r\n"


@pytest.mark.parametrize("command", ["STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "UIDL", "TOP 1 1"])
def test_transaction_commands_refused_before_login(store, command):
    session = POP3Harness(store)
    name = command.split()[0]
    assert session.command(command) == f"-ERR {name} is not valid in this state.\r\n".encode()


def test_commands_are_case_insensitive(session):
    assert session.command("stat") == b"+OK 2 91\r\n"
    assert session.command("List 2") == b"+OK 2 40\r\n"


def test_overlong_line_is_refused_and_session_goes_on(session):
    assert session.send(b"NOOP " + b"x" * 600 + b"\r\n") == b"-ERR Line too long.\r\n"
    # Also when the long line arrives in pieces.
    assert session.send(b"LIST " + b"9" * 400) == b""
    assert session.send(b"9" * 400) == b""
    assert session.send(b"\r\nSTAT\r\n") == b"-ERR Line too long.\r\n+OK 2 91\r\n"


def test_a_line_at_the_limit_is_accepted(session):
    assert session.send(b"NOOP " + b"x" * 507 + b"\r\n") == b"+OK\r\n"


def test_too_many_bad_commands_disconnect(store):
    session = POP3Harness(store, make_pop3_config(limits={"max_errors": 3}))
    session.command("XA")
    session.command("XB")
    assert session.command("XC") == b"-ERR Unknown command.\r\n-ERR Too many invalid commands.\r\n"
    assert session.closed


def test_pipelined_commands_answered_in_order(session):
    reply = session.send(b"STAT\r\nRETR 2\r\nDELE 2\r\nLIST\r\nQUIT\r\n")
    assert reply == (
        b"+OK 2 91\r\n"
        b"+OK 40 octets\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n.\r\n"
        b"+OK Message 2 marked to be deleted.\r\n"
        b"+OK 1 messages (51 octets)\r\n1 51\r\n.\r\n"
        b"+OK Logging out, 1 messages deleted.\r\n"
    )
    assert session.closed


def test_bare_lf_line_endings_accepted(session):
    assert session.send(b"STAT\nNOOP\n") == b"+OK 2 91\r\n+OK\r\n"


def test_idle_timeout_closes_and_activity_resets_it(store):
    session = POP3Harness(store, make_pop3_config(limits={"pop3_idle_timeout": 60}))
    session.clock.advance(50)
    session.command("CAPA")
    session.clock.advance(50)
    assert not session.closed
    session.clock.advance(11)
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n"
    assert session.closed


def test_idle_timeout_after_login_releases_lock_on_close(session, store):
    session.clock.advance(600)
    assert session.closed
    session.drop()
    assert store.locked == set()
    assert session.clock.getDelayedCalls() == []


def test_retr_when_the_file_cannot_be_read_is_sys_temp(session, store):
    store.fail_open = True
    assert session.command("RETR 1") == b"-ERR [SYS/TEMP] The message cannot be read now.\r\n"
    assert session.command("NOOP") == b"+OK\r\n"


def test_retr_of_a_message_removed_meanwhile_says_so(session, store):
    # An IMAP client (or another program) expunged it after this session
    # listed the maildrop: gone for good, not worth a retry nor a traceback.
    del store.boxes["bob@localhost"][0]
    assert session.command("RETR 1") == b"-ERR The message was removed by another client.\r\n"
    assert session.command("TOP 1 0") == b"-ERR The message was removed by another client.\r\n"
    assert session.command("NOOP") == b"+OK\r\n"


def test_commands_wait_while_a_transfer_is_paused(store):
    big = b"Subject: big\n\n" + b"x" * 200_000 + b"\n"
    store.deliver("bob@localhost", big, "1700000002.M3P1Q1.test")
    session = POP3Harness(store)
    session.login()
    transport = session.transport
    original_write = transport.write

    def write_then_pause(data):
        original_write(data)
        if isinstance(transport.producer, MessageTransfer):
            transport.producer.pauseProducing()

    transport.write = write_then_pause
    first = session.send(b"RETR 3\r\nSTAT\r\n")
    assert first.startswith(b"+OK 200018 octets\r\nSubject: big\r\n")
    assert transport.producerState == "paused"  # stopped reading meanwhile
    out = [first]
    while isinstance(transport.producer, MessageTransfer):
        transport.producer.resumeProducing()
        out.append(session.take())
    wire = b"".join(out)
    assert wire.endswith(b"x\r\n.\r\n+OK 3 200109\r\n")
    assert len(wire) == len(b"+OK 200018 octets\r\n") + 200018 + 3 + len(b"+OK 3 200109\r\n")
    assert transport.producerState == "producing"


def test_drop_during_transfer_stops_it_and_unlocks(store):
    store.deliver("bob@localhost", b"x" * 500_000, "1700000002.M3P1Q1.test")
    session = POP3Harness(store)
    session.login()
    transport = session.transport
    transport.write = lambda data: transport.producer.pauseProducing()
    session.command("RETR 3")
    producer = transport.producer
    session.drop()
    assert producer._ended
    assert store.locked == set()
    assert not store.message("bob@localhost", "1700000002.M3P1Q1.test").seen


def test_one_log_line_per_session(session):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session.command("RETR 1")
        session.command("DELE 1")
        session.command("QUIT")
        session.drop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    ended = [e for e in events if e.get("event") == "pop3.session"]
    assert len(ended) == 1
    assert (ended[0]["user"], ended[0]["retrieved"], ended[0]["deleted"]) == ("bob@localhost", 1, 1)
    assert ended[0]["octets"] == len(b"+OK 51 octets\r\n") + len(FIRST_WIRE) + 3
    assert ended[0]["client"] == "127.0.0.1:40000"


def _run_one_turn(clock) -> None:
    """
    Run the calls due now, but not those they schedule for the next turn.
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def test_quit_renames_and_removes_a_slice_per_reactor_turn():
    store = MemoryMaildirs()
    uids = [f"17000{n:05d}.M{n}P1Q1.test" for n in range(300)]
    for uid in uids:
        store.deliver("bob@localhost", b"Subject: x\n\nbody\n", uid)
    session = POP3Harness(store, sliced=True)
    session.login()
    for number in range(1, 201):
        assert session.command(f"RETR {number}").startswith(b"+OK")
    for number in range(201, 301):
        assert session.command(f"DELE {number}").startswith(b"+OK")

    def seen() -> int:
        return sum(m.seen for m in store.boxes["bob@localhost"])

    assert session.command("QUIT") == b""
    assert seen() == 0
    _run_one_turn(session.clock)  # 256 steps: 200 renames, 56 removals
    assert (seen(), len(store.boxes["bob@localhost"])) == (200, 244)
    assert session.take() == b"" and not session.closed
    _run_one_turn(session.clock)
    assert store.deletions == [("bob@localhost", uids[200:])]
    assert session.take() == b"+OK Logging out, 100 messages deleted.\r\n"
    assert session.closed


def test_replies_to_pipelined_commands_go_out_in_one_write(session):
    writes = []
    write = session.transport.write
    session.transport.write = lambda data: (writes.append(data), write(data))
    session.send(b"STAT\r\nLIST 2\r\nRETR 2\r\nNOOP\r\n")
    assert len(writes) == 1
    assert writes[0].startswith(b"+OK 2 91\r\n+OK 2 40\r\n+OK 40 octets\r\n")
    assert writes[0].endswith(b".\r\n+OK\r\n")
