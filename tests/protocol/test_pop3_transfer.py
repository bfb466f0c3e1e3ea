"""
The LF → dot-stuffed CRLF encoder and the streaming producer behind RETR/TOP.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from mailserver.pop3.transfer import MessageTransfer, TransferStopped, WireEncoder


def reference_wire(data: bytes, body_lines: int | None = None) -> bytes:
    """
    The expected response body, computed the slow obvious way.
    """
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if complete:
        lines = lines[:-1]
    if body_lines is not None:
        kept, in_headers, left = [], True, body_lines
        for line in lines:
            if in_headers:
                kept.append(line)
                in_headers = line != b""
            elif left > 0:
                kept.append(line)
                left -= 1
            else:
                break
        lines = kept
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def encode_in_chunks(data: bytes, size: int, body_lines: int | None = None) -> bytes:
    encoder = WireEncoder(body_lines)
    out = b"".join(encoder.encode(data[i : i + size]) for i in range(0, len(data), size))
    return out + encoder.terminator()


def test_crlf_and_dot_stuffing():
    data = b"Subject: x\n\n.\n..two\n.lead\n . not\nlast\n"
    assert encode_in_chunks(data, 1000) == (
        b"Subject: x\r\n\r\n..\r\n...two\r\n..lead\r\n . not\r\nlast\r\n.\r\n"
    )


def test_first_line_of_message_is_stuffed():
    assert encode_in_chunks(b".hidden\n", 100) == b"..hidden\r\n.\r\n"


def test_chunk_boundaries_between_newline_and_dot():
    data = b"a\n.b\n\n.c\n"
    for size in range(1, len(data) + 1):
        assert encode_in_chunks(data, size) == b"a\r\n..b\r\n\r\n..c\r\n.\r\n", size


def test_unterminated_last_line_is_completed():
    assert encode_in_chunks(b"a\nno newline", 3) == b"a\r\nno newline\r\n.\r\n"


def test_stray_cr_is_kept_and_every_lf_expanded():
    # The intake stored "x\r\r\n" as "x\r\n"; W= counts one more octet per LF.
    assert encode_in_chunks(b"x\r\n", 10) == b"x\r\r\n.\r\n"


@pytest.mark.parametrize(
    "lines, expected",
    [
        (0, b"A: 1\r\nB: 2\r\n\r\n.\r\n"),
        (1, b"A: 1\r\nB: 2\r\n\r\nbody1\r\n.\r\n"),
        (2, b"A: 1\r\nB: 2\r\n\r\nbody1\r\n..dot\r\n.\r\n"),
        (99, b"A: 1\r\nB: 2\r\n\r\nbody1\r\n..dot\r\nbody3\r\n.\r\n"),
    ],
)
def test_top_lines(lines, expected):
    data = b"A: 1\nB: 2\n\nbody1\n.dot\nbody3\n"
    for size in (1, 2, 5, 1000):
        assert encode_in_chunks(data, size, lines) == expected, size


def test_top_of_message_without_body_sends_it_all():
    assert encode_in_chunks(b"A: 1\nB: 2\n", 4, 0) == b"A: 1\r\nB: 2\r\n.\r\n"


messages = st.lists(
    st.sampled_from([b"", b".", b"..", b"a", b".x", b" .", b"\r", b"Header: v"]), max_size=12
).map(lambda lines: b"\n".join(lines)) | st.binary(max_size=60)


@settings(max_examples=300, deadline=None)
@given(data=messages, size=st.integers(1, 16), top=st.none() | st.integers(0, 4))
def test_any_message_any_chunking_matches_reference(data, size, top):
    assert encode_in_chunks(data, size, top) == reference_wire(data, top)


class ChunkRecorder(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        super().write(data)


def test_small_message_goes_out_in_one_write_with_status_line():
    consumer = ChunkRecorder()
    transfer = MessageTransfer(io.BytesIO(b"Hi\n.\n"), consumer, b"+OK 9 octets\r\n", WireEncoder())
    done = []
    transfer.finished.addCallback(done.append)
    transfer.start()
    assert consumer.value() == b"+OK 9 octets\r\nHi\r\n..\r\n.\r\n"
    assert len(consumer.writes) == 1
    assert done == [len(consumer.value())]
    assert consumer.producer is None


def test_large_message_streams_in_bounded_chunks_while_paused_and_resumed():
    line = b".dot at start of a line, then text to fill it up to a decent length\n"
    data = b"Subject: big\n\n" + line * (3 * 1024 * 1024 // len(line))
    source = io.BytesIO(data)
    consumer = ChunkRecorder()
    chunk_size = 64 * 1024
    transfer = MessageTransfer(source, consumer, b"+OK\r\n", WireEncoder(), chunk_size)
    received = []
    done = []
    transfer.finished.addCallback(done.append)

    # A transport whose buffer is "full" after every write: it pauses the
    # producer, and the test plays the reactor, draining and resuming.
    original_write = consumer.write

    def write_then_pause(chunk):
        original_write(chunk)
        received.append(consumer.value())
        consumer.clear()
        transfer.pauseProducing()

    consumer.write = write_then_pause
    transfer.start()
    rounds = 1
    while not done:
        assert consumer.producer is transfer
        transfer.resumeProducing()
        rounds += 1
    assert b"".join(received) == b"+OK\r\n" + reference_wire(data)
    assert max(consumer.writes) <= 2 * chunk_size + 16
    assert rounds == len(received) >= len(data) // chunk_size
    assert source.closed
    assert consumer.producer is None


def test_stop_producing_closes_the_file_and_reports():
    source = io.BytesIO(b"x\n" * 100_000)
    consumer = StringTransport()
    transfer = MessageTransfer(source, consumer, b"+OK\r\n", WireEncoder(), 1024)
    failures = []
    transfer.finished.addErrback(failures.append)
    consumer.write = lambda data: transfer.pauseProducing()
    transfer.start()
    transfer.stopProducing()
    assert source.closed
    assert failures[0].check(TransferStopped)


def test_read_error_fails_the_transfer():
    class Broken(io.BytesIO):
        def read(self, size=-1):
            raise OSError("I/O error")

    consumer = StringTransport()
    transfer = MessageTransfer(Broken(b""), consumer, b"+OK\r\n", WireEncoder())
    failures = []
    transfer.finished.addErrback(failures.append)
    transfer.start()
    assert failures[0].check(OSError)
    assert consumer.producer is None
