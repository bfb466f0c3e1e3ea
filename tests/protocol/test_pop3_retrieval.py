"""
RETR and TOP read message files in the worker thread, never on the reactor
thread, and the messages of a turn of pipelined commands in one call; the
responses still go out in the order the commands came.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from mailserver.pop3.retrieval import BATCH_OCTETS, READ_AHEAD_OCTETS
from mailserver.pop3.storage import read_messages
from mailserver.testing import MemoryMailbox, MemoryMaildirs, POP3Harness

SMALL = [b"Subject: one\n\nbody 1\n", b"Subject: two\n\nbody 2\n.\n"]
SMALL_WIRE = [
    b"+OK 24 octets\r\nSubject: one\r\n\r\nbody 1\r\n.\r\n",
    b"+OK 27 octets\r\nSubject: two\r\n\r\nbody 2\r\n..\r\n.\r\n",
]


class Worker:
    """
    A thread pool whose thread runs only when the test says: C{run_blocking}
    holds each call until L{run}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.running = False

    def __call__(self, f, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> list:
        """
        Run what is waiting (and what that asks for); return the functions.
        """
        ran = []
        while self.calls:
            f, args, d = self.calls.pop(0)
            ran.append((f, args))
            self.running = True
            try:
                result = f(*args)
            except BaseException:
                result = Failure()
            finally:
                self.running = False
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)
        return ran


@pytest.fixture
def worker(monkeypatch) -> Worker:
    worker = Worker()
    opened = []
    read_whole, open_ = MemoryMailbox.read_whole, MemoryMailbox.open

    def read_in_worker(self, message, limit):
        assert worker.running, "a message read on the reactor thread"
        return read_whole(self, message, limit)

    def open_in_worker(self, message):
        assert worker.running, "a message opened on the reactor thread"
        opened.append(open_(self, message))
        return opened[-1]

    monkeypatch.setattr(MemoryMailbox, "read_whole", read_in_worker)
    monkeypatch.setattr(MemoryMailbox, "open", open_in_worker)
    worker.opened = opened
    return worker


def logged_in(worker: Worker, *messages: bytes) -> tuple[POP3Harness, MemoryMaildirs]:
    store = MemoryMaildirs()
    for number, data in enumerate(messages or SMALL):
        store.deliver("bob@localhost", data, f"170000000{number}.M{number}P1Q1.test")
    session = POP3Harness(store, run_blocking=worker)
    session.command("USER bob@localhost")
    assert session.command("PASS secret") == b""
    worker.run()
    assert session.take().startswith(b"+OK Logged in")
    return session, store


def test_pipelined_retrievals_are_read_in_one_call_off_the_reactor_thread(worker):
    session, _ = logged_in(worker)
    writes = []
    write = session.transport.write
    session.transport.write = lambda data: (writes.append(data), write(data))
    assert session.send(b"RETR 1\r\nLIST 2\r\nTOP 2 0\r\nRETR 2\r\n") == b""
    assert [f for f, _ in worker.run()] == [read_messages]
    assert writes == [
        SMALL_WIRE[0] + b"+OK 2 27\r\n" + b"+OK\r\nSubject: two\r\n\r\n.\r\n" + SMALL_WIRE[1]
    ]


def test_quit_after_retrievals_waits_for_them(worker):
    session, store = logged_in(worker)
    # QUIT flags what was retrieved: it must not run before RETR is done.
    assert session.send(b"RETR 2\r\nQUIT\r\n") == b""
    worker.run()
    assert session.take() == SMALL_WIRE[1] + b"+OK Logging out, 0 messages deleted.\r\n"
    assert store.message("bob@localhost", "1700000001.M1P1Q1.test").seen
    assert not store.message("bob@localhost", "1700000000.M0P1Q1.test").seen
    assert session.closed and store.locked == set()


def test_an_unreadable_message_is_answered_in_its_place(worker):
    session, store = logged_in(worker)
    store.fail_open = True
    session.send(b"RETR 1\r\nRETR 2\r\n")
    worker.run()
    assert session.take() == b"-ERR [SYS/TEMP] The message cannot be read now.\r\n" * 2
    store.fail_open = False
    session.send(b"RETR 1\r\n")
    worker.run()
    assert session.take() == SMALL_WIRE[0]


def test_a_large_message_is_opened_in_the_worker_and_streamed(worker):
    big = b"Subject: big\n\n" + b"x" * 300_000 + b"\n"
    session, _ = logged_in(worker, SMALL[0], big)
    assert session.send(b"RETR 2\r\nSTAT\r\n") == b""
    worker.run()
    out = session.take()
    assert out.startswith(b"+OK 300018 octets\r\nSubject: big\r\n\r\nxxx")
    assert out.endswith(b"x\r\n.\r\n+OK 2 300042\r\n")
    assert [source.closed for source in worker.opened] == [True]


def test_a_client_leaving_while_its_messages_are_read(worker):
    big = b"Subject: big\n\n" + b"x" * 300_000 + b"\n"
    session, store = logged_in(worker, SMALL[0], big)
    session.send(b"RETR 1\r\nRETR 2\r\n")
    session.drop()
    worker.run()
    assert session.take() == b""
    assert [source.closed for source in worker.opened] == [True]
    assert store.locked == set()


def test_a_turn_holds_a_bounded_amount_of_messages(worker):
    message = b"Subject: x\n\n" + b"y" * 100_000 + b"\n"
    session, _ = logged_in(worker, *[message] * 5)
    session.send(b"".join(b"RETR %d\r\n" % n for n in range(1, 6)))
    sizes = []
    while worker.calls:
        for f, args in worker.run():
            sizes.append(len(args[0]))
    size = len(message) + message.count(b"\n")
    first = -(-BATCH_OCTETS // size)  # the batch is read once it holds BATCH_OCTETS
    assert READ_AHEAD_OCTETS // size == 1
    # The first call reads what was asked for and one message ahead, which
    # answers the next RETR; the second call reads the last message.
    assert first + 1 < 5 and sizes == [first + 1, 5 - first - 1]
    assert session.take().count(b"+OK %d octets\r\n" % size) == 5


def test_the_next_messages_are_read_ahead_of_the_client(worker):
    big = b"Subject: big\n\n" + b"x" * 300_000 + b"\n"
    session, _ = logged_in(worker, SMALL[0], big, *SMALL, *SMALL)
    session.command("DELE 4")
    assert session.command("RETR 1") == b""
    ((f, (wanted,)),) = worker.run()
    # What was asked for, then the small live messages after it (the
    # large one and the deleted one are left alone).
    assert [message.uid[:12] for _, message in wanted] == [
        "1700000000.M", "1700000002.M", "1700000004.M", "1700000005.M",
    ]
    assert session.take() == SMALL_WIRE[0]
    # Answered at once, from what was read ahead.
    assert session.send(b"RETR 3\r\nRETR 5\r\nRETR 6\r\n") == (
        SMALL_WIRE[0] + SMALL_WIRE[0] + SMALL_WIRE[1]
    )
    assert worker.calls == []
    # Taken once: asked again, a message is read again.
    assert session.send(b"RETR 3\r\n") == b""
    assert len(worker.run()) == 1 and session.take() == SMALL_WIRE[0]


def test_top_reads_nothing_ahead(worker):
    session, _ = logged_in(worker)
    session.command("TOP 1 0")
    ((f, (wanted,)),) = worker.run()
    assert len(wanted) == 1
    assert session.take() == b"+OK\r\nSubject: one\r\n\r\n.\r\n"


def test_what_was_read_ahead_goes_with_the_connection(worker):
    session, _ = logged_in(worker)
    session.command("RETR 1")
    worker.run()
    session.drop()
    assert session.protocol._retriever._read_ahead == {}
