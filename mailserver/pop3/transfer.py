"""
Streaming a stored message to a POP3 client.

Maildir files use LF line endings; POP3 sends CRLF lines, doubles a leading
C{.} on every line (RFC 1939 section 3) and ends the multi-line response with
C{.CRLF}.  L{WireEncoder} does that transformation one chunk at a time (with
the wire room's L{DotStuffer}, which carries a line start or a C{\\n} split
across two chunks) and cuts a C{TOP} response short, and
L{MessageTransfer} pushes the chunks to the transport as a streaming
producer, so memory stays bounded whatever the message size.

Every LF becomes CRLF, even one after a stray CR (a file some other program
put there): the intake stores CRLF as LF (the SMTP server refuses bare CRs
and LFs), and the C{,W=} size in the file name counts exactly one extra
octet per LF, so this reproduces the received bytes and the advertised octet
count.
"""

from __future__ import annotations

from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from mailserver.wire.dots import DotStuffer

CHUNK_SIZE = 64 * 1024


class TransferStopped(Exception):
    """
    The transport stopped the transfer (the client went away).
    """


class WireEncoder:
    """
    Turns LF file bytes into dot-stuffed CRLF wire bytes, chunk by chunk.

    With C{body_lines} set (the C{TOP} command), only the header section, the
    blank line after it and that many body lines are let through; L{done}
    then says the rest of the file need not be read.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._body_lines_left = body_lines
        self._in_headers = body_lines is not None
        self._stuffer = DotStuffer()
        self.done = False

    def encode(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        if self._body_lines_left is not None:
            chunk = self._limit(chunk)
        return self._stuffer.feed(chunk)

    def terminator(self) -> bytes:
        """
        The end of the multi-line response, completing an unterminated last
        line first.
        """
        return self._stuffer.end()

    def _limit(self, chunk: bytes) -> bytes:
        head = b""
        if self._in_headers:
            if self._stuffer.at_line_start and chunk.startswith(b"\n"):
                end = 1
            else:
                found = chunk.find(b"\n\n")
                end = found + 2 if found >= 0 else -1
            if end < 0:
                return chunk
            self._in_headers = False
            head, chunk = chunk[:end], chunk[end:]
        assert self._body_lines_left is not None
        newlines = chunk.count(b"\n")
        if newlines < self._body_lines_left:
            self._body_lines_left -= newlines
            return head + chunk
        position = -1
        for _ in range(self._body_lines_left):
            position = chunk.find(b"\n", position + 1)
        self._body_lines_left = 0
        self.done = True
        return head + chunk[: position + 1]


@implementer(IPushProducer)
class MessageTransfer:
    """
    Sends C{prefix} (the C{+OK} line), the encoded message and the
    terminator to C{consumer}, one chunk per write while the consumer wants
    more.

    A push producer: it writes until the transport's buffer is full and the
    transport pauses it, then continues when the transport resumes it, so
    at most about one transport buffer plus one chunk is held in memory.
    The first chunk shares its write with the C{+OK} line, so a small
    message goes out in a single write.

    @ivar finished: fires with the number of octets written once the
        terminator is written, or fails with L{TransferStopped} if the
        transport stopped the transfer, or with the C{OSError} of a failed
        read (the response is then cut short and the caller must close the
        connection).
    """

    def __init__(
        self,
        source: BinaryIO,
        consumer: IConsumer,
        prefix: bytes,
        encoder: WireEncoder,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._source = source
        self._consumer = consumer
        self._prefix = prefix
        self._encoder = encoder
        self._chunk_size = chunk_size
        self._paused = False
        self._ended = False
        self.sent = 0
        self.finished: Deferred[int] = Deferred()

    def start(self) -> None:
        self._consumer.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        if not self._ended:
            self._end()
            self.finished.errback(TransferStopped())

    def _produce(self) -> None:
        while not self._paused and not self._ended:
            try:
                chunk = self._source.read(self._chunk_size)
            except OSError as e:
                self._end()
                self._consumer.unregisterProducer()
                self.finished.errback(e)
                return
            data = self._prefix + self._encoder.encode(chunk)
            self._prefix = b""
            # A regular file returns a short read only at its end.
            last = len(chunk) < self._chunk_size or self._encoder.done
            if last:
                data += self._encoder.terminator()
                self._end()
            self.sent += len(data)
            if data:
                self._consumer.write(data)
            if last:
                self._consumer.unregisterProducer()
                self.finished.callback(self.sent)

    def _end(self) -> None:
        self._ended = True
        self._source.close()
