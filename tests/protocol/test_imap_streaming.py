"""
FETCH of large messages: streamed from the file a piece at a time (each
read in a worker thread), at the pace the client reads, and the session
handles nothing else meanwhile; structures parsed once and cached.
"""

import re

import pytest
from twisted.internet import defer

from tests.protocol.imap_harness import IMAPHarness, Later, tagged, untagged


def big_message(lines: int) -> bytes:
    head = b"Subject: big\nContent-Type: text/plain\n\n"
    return head + b"".join(b"line %07d of the body\n" % n for n in range(lines))


@pytest.fixture
def later(tmp_path):
    threads = Later()
    imap = IMAPHarness(tmp_path, run_blocking=threads)

    def command(line):
        imap.send(line + "\r\n")
        threads.run()
        return imap.read()

    imap.run = threads
    imap.cmd = command
    return imap


def test_a_large_message_is_sent_byte_exact_in_crlf_form(later):
    data = big_message(40000)  # about 1 MB
    later.deliver("1000.M1P1Q1.h", data)
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    wire = data.replace(b"\n", b"\r\n")
    out = later.cmd("a UID FETCH 1 BODY.PEEK[]")
    head = b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(wire)
    assert out.startswith(head)
    assert out[len(head) : len(head) + len(wire)] == wire
    assert out[len(head) + len(wire) :] == b")\r\na OK Fetch completed.\r\n"


def test_partial_and_sections_of_a_large_message(later):
    data = big_message(40000)
    later.deliver("1000.M1P1Q1.h", data)
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    wire = data.replace(b"\n", b"\r\n")
    out = later.cmd("a FETCH 1 (BODY.PEEK[]<500000.30> BODY.PEEK[TEXT]<0.10> BODYSTRUCTURE)")
    assert b"BODY[]<500000> {30}\r\n" + wire[500000:500030] in out
    body_start = wire.index(b"\r\n\r\n") + 4
    assert b"BODY[TEXT]<0> {10}\r\n" + wire[body_start : body_start + 10] in out
    assert b'BODYSTRUCTURE ("text" "plain" NIL NIL NIL "7bit" %d 40000' % (len(wire) - body_start) in out


def step(harness, count):
    for _ in range(count):
        if not harness.run.calls:
            return
        f, args, d = harness.run.calls.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(d)


def test_the_transfer_waits_while_the_client_does_not_read(later):
    data = big_message(40000)
    later.deliver("1000.M1P1Q1.h", data)
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    later.send(b"c FETCH 1 BODY.PEEK[]\r\n")
    step(later, 4)  # the read, the parse, the first pieces
    fetcher = later.protocol._fetcher
    fetcher.pauseProducing()  # the transport's buffer is full
    step(later, 1)  # the piece being read still goes out
    sent = len(later.read())
    assert sent < len(data)
    later.run.run()
    assert not later.run.calls  # no more reads while paused
    assert later.read() == b""
    fetcher.resumeProducing()
    later.run.run()
    rest = later.read()
    assert sent + len(rest) > len(data)
    assert rest.endswith(b"c OK Fetch completed.\r\n")


def test_commands_after_a_fetch_wait_for_it(later):
    later.deliver("1000.M1P1Q1.h", big_message(20000))
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    later.send(b"a FETCH 1 BODY.PEEK[]\r\nb NOOP\r\n")
    assert later.read() == b""  # the read waits for its worker thread
    later.run.run()
    out = later.read()
    assert out.index(b"a OK Fetch completed.") < out.index(b"b OK NOOP completed.")


def test_structures_are_parsed_once(later):
    later.deliver("1000.M1P1Q1.h", b"Subject: once\n\nbody\n")
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    structures = later.protocol._deps.structures
    later.cmd("a FETCH 1 ENVELOPE")
    assert len(structures) == 1
    cached = next(iter(structures._entries.values()))[0]
    later.cmd("b FETCH 1 BODYSTRUCTURE")
    assert next(iter(structures._entries.values()))[0] is cached


def test_the_client_going_away_mid_transfer_closes_the_file(later):
    later.deliver("1000.M1P1Q1.h", big_message(40000))
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    later.send(b"a FETCH 1 BODY.PEEK[]\r\n")
    step(later, 1)  # the read: a file is open
    fetcher = later.protocol._fetcher
    assert fetcher._open
    opened = list(fetcher._open)
    later.transport.loseConnection()
    fetcher.stopProducing()
    later.lose()
    later.run.run()
    assert all(source.closed for source in opened)


def test_pipelined_fetches_are_answered_in_order_with_one_read(later):
    for n in range(5):
        later.deliver(f"100{n}.M1P1Q1.h", b"Subject: %d\n\nbody %d\n" % (n, n))
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    later.send(b"".join(b"f%d UID FETCH %d BODY[]\r\n" % (n, n + 1) for n in range(5)) + b"n NOOP\r\nbad command\r\n")
    jobs = [f.__name__ for f, _, _ in later.run.calls]
    assert jobs == ["read"]  # \Seen set for the five at once (inline), one read for them
    later.run.run()
    out = later.read()
    order = [m.group(0) for m in re.finditer(rb"^(\* \d FETCH|f\d OK|n OK|bad BAD)", out, re.M)]
    assert order == [
        b"* 1 FETCH", b"f0 OK", b"* 2 FETCH", b"f1 OK", b"* 3 FETCH", b"f2 OK",
        b"* 4 FETCH", b"f3 OK", b"* 5 FETCH", b"f4 OK", b"n OK", b"bad BAD",
    ]


def test_many_sections_of_a_small_message_wait_for_the_client_too(later):
    # A message under WHOLE_MESSAGE is read whole, but a FETCH may name
    # hundreds of its large sections in one 64 KiB line: they go out as the
    # client reads, not all into memory at once (300 x 200 KB was 60 MB).
    data = big_message(8000)  # about 200 KB
    later.deliver("1000.M1P1Q1.h", data)
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    wire = data.replace(b"\n", b"\r\n")
    later.send(b"c FETCH 1 (" + b" ".join(b"BODY.PEEK[]<%d.300000>" % n for n in range(300)) + b")\r\n")
    fetcher = later.protocol._fetcher
    fetcher.pauseProducing()  # the client reads nothing
    later.run.run()
    sent = len(later.read())
    assert sent < 2 * len(wire)
    out = b""
    while True:
        fetcher.resumeProducing()
        later.run.run()
        piece = later.read()
        out += piece
        if piece.endswith(b"c OK Fetch completed.\r\n") or not piece:
            break
    assert out.endswith(b")\r\nc OK Fetch completed.\r\n")
    assert b"BODY[]<299> {%d}\r\n%s)" % (len(wire) - 299, wire[299:]) in out


@pytest.mark.parametrize(
    "item",
    ["BODY.PEEK[]<%d.16000>", "BODY.PEEK[HEADER.FIELDS (X-Big X-%d)]"],
    ids=["partials", "header-fields"],
)
def test_many_distinct_sections_wait_for_the_client_too(later, item):
    # Distinct items are not folded into one: each is made only when the
    # one before went out, and small ones are sent once they add up.
    data = b"X-Big: " + b"b" * 150_000 + b"\nSubject: x\n\n" + b"body\n" * 20_000
    later.deliver("1000.M1P1Q1.h", data)
    later.cmd("L LOGIN bob@example.org secret")
    later.cmd("S SELECT INBOX")
    later.send(b"c FETCH 1 (" + b" ".join((item % n).encode() for n in range(400)) + b")\r\n")
    fetcher = later.protocol._fetcher
    fetcher.pauseProducing()
    later.run.run()
    assert len(later.read()) < 400_000
    out = b""
    while not out.endswith(b"c OK Fetch completed.\r\n"):
        fetcher.resumeProducing()
        later.run.run()
        piece = later.read()
        assert piece
        out += piece
    assert len(out) > 400 * 16000
