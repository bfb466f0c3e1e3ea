"""
Sending stored messages (RETR and TOP) without reading files on the
reactor thread, and without a trip to a worker thread per message.

A handler asks for a message with a L{Retrieve}.  The glue hands the
L{Retrieve}s of one turn of pipelined commands, and the responses that
follow them, to a L{Retriever}: at the end of the turn it reads every
message in one worker-thread call (L{read_messages}), then sends the
responses in order, each small message in one piece with its C{+OK} line,
a large one streamed through a L{MessageTransfer} while the rest waits.
Meanwhile the session handles no more commands.

A client fetching a mailbox asks for one message after another, a few at
a time: the same call also reads the messages a L{Retrieve} says come
next (L{Retrieve.ahead}), up to L{READ_AHEAD_OCTETS}, so that most RETRs
find their message already read and are answered at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.logs import emit_failure
from mailserver.pop3.responses import Response
from mailserver.pop3.storage import WHOLE_MESSAGE, read_messages
from mailserver.pop3.transfer import MessageTransfer, TransferStopped, WireEncoder
from mailserver.wire.effects import CLOSE
from mailserver.wire.flow import BUSY
from mailserver.wire.session import LineSession

# A turn's messages read in one call, in octets, past which the call is
# made before the next command is handled: what a session holds at once.
BATCH_OCTETS = 256 * 1024
# Messages read ahead of the client's asking, in octets: what a session
# holds between its commands.
READ_AHEAD_OCTETS = 128 * 1024


class Retrieve(NamedTuple):
    """
    Send a stored message as a multi-line response: C{status}, the text
    through C{encoder}, the terminating line.  (A named tuple: one is made
    per RETR.)

    @ivar then: told the octets sent, or the L{Failure} of opening or
        reading the message before anything was sent; returns the result
        to carry out (a response for the failure).
    @ivar ahead: the messages the client is likely to ask for next, oldest
        first, or C{None}.
    """

    mailbox: object
    message: object
    status: Response
    encoder: WireEncoder
    then: Callable[[int | Failure], object]
    ahead: Callable[[], Iterable[object]] | None = None


class Retriever:
    """
    The turn's retrievals, the responses queued behind them, and the
    messages read ahead.

    @param perform: carries out a session result (the glue's).
    """

    log = Logger(namespace="mailserver.pop3")

    def __init__(
        self,
        lines: LineSession,
        run_blocking: Callable[..., defer.Deferred],
        perform: Callable[[object], None],
    ) -> None:
        self._lines = lines
        self._run_blocking = run_blocking
        self._perform = perform
        self._queue: list[Retrieve | Response] = []
        self._reads: list[Retrieve] = []
        self._octets = 0
        self._read_ahead: dict[str, bytes] = {}
        self._transfer: MessageTransfer | None = None
        self._unsent: list = []

    @property
    def queued(self) -> bool:
        """
        A retrieval waits for its message to be read: responses go behind
        it.
        """
        return bool(self._reads)

    @property
    def full(self) -> bool:
        """
        Enough is queued: read it before handling more commands.
        """
        return self._octets >= BATCH_OCTETS

    @property
    def streaming(self) -> bool:
        return self._transfer is not None

    def add(self, item: Retrieve | Response) -> None:
        """
        Send a message read ahead at once, or queue a retrieval, or a
        response to send after the queued ones.
        """
        if item.__class__ is Retrieve:
            if not self._reads:
                data = self._read_ahead.pop(item.message.uid, None)
                if data is not None:
                    self._send_read(item, data)
                    return
            self._reads.append(item)
            size = item.message.size
            # A message to stream ends the batch: what follows it waits.
            self._octets += size if size < WHOLE_MESSAGE else BATCH_OCTETS
        self._queue.append(item)

    def send_queued(self, then: Callable[[object], None]) -> None:
        """
        Read the queued messages (and the next ones) in one worker-thread
        call and send them and the responses between them in order; the
        session handles no commands meanwhile, and C{then} is called when
        all is sent.
        """
        queue, reads = self._queue, self._reads
        self._queue, self._reads, self._octets = [], [], 0
        wanted = [(r.mailbox, r.message) for r in reads]
        last = reads[-1]
        ahead = self._ahead(last, {r.message.uid for r in reads}) if last.ahead else []
        sent: defer.Deferred = defer.Deferred()
        reading = self._run_blocking(read_messages, wanted + [(last.mailbox, m) for m in ahead])
        reading.addCallbacks(self._read, self._failed, callbackArgs=(queue, ahead, sent))
        self._lines.wait(sent, then)

    def _ahead(self, last: Retrieve, wanted: set[str]) -> list:
        """
        The small messages after the last one asked for, up to
        L{READ_AHEAD_OCTETS}.
        """
        ahead = []
        octets = 0
        for message in last.ahead():
            size = message.size
            if size >= WHOLE_MESSAGE or message.uid in wanted:
                continue
            octets += size
            if octets > READ_AHEAD_OCTETS:
                break
            ahead.append(message)
        return ahead

    def stop(self) -> None:
        """
        The connection is gone: stop a transfer, close the files opened
        and not sent, forget what was read ahead.
        """
        if self._transfer is not None:
            self._transfer.stopProducing()
        self._close_unsent()
        self._read_ahead = {}

    def _close_unsent(self) -> None:
        for source in self._unsent:
            if not isinstance(source, (bytes, Failure)):
                source.close()
        self._unsent = []

    # Sending, in order.

    def _read(self, results: list, queue: list, ahead: list, sent: defer.Deferred) -> None:
        if ahead:
            # Only what this call read ahead is kept: earlier guesses the
            # client did not take are dropped.
            self._read_ahead = {}
            for message, data in zip(ahead, results[-len(ahead) :]):
                if data.__class__ is bytes:
                    self._read_ahead[message.uid] = data
                elif not isinstance(data, Failure):
                    data.close()  # larger than its size said: read when asked for
            del results[-len(ahead) :]
        self._unsent = results
        self._send(iter(queue), sent)

    def _failed(self, failure: Failure) -> None:
        emit_failure(self.log, "pop3.read_failed", "reading messages failed; closing the session",
                     failure)
        self._perform(CLOSE)

    def _send(self, queue, sent: defer.Deferred) -> None:
        lines = self._lines
        results = self._unsent
        for item in queue:
            if lines.closed:
                self._close_unsent()
                return
            if item.__class__ is not Retrieve:
                lines.send(item.render())
                continue
            result = results.pop(0)
            if result.__class__ is bytes:
                self._send_read(item, result)
            elif isinstance(result, Failure):
                self._perform(item.then(result))
            else:
                self._stream(item, result, queue, sent)
                return
        sent.callback(None)

    def _send_read(self, item: Retrieve, data: bytes) -> None:
        encoder = item.encoder
        wire = item.status.render() + encoder.encode(data) + encoder.terminator()
        self._lines.send(wire)
        self._perform(item.then(len(wire)))

    def _stream(self, item: Retrieve, source, queue, sent: defer.Deferred) -> None:
        """
        Send a large message as the transport reads it, with no commands
        read meanwhile; then go on with the rest of the queue.
        """
        lines = self._lines
        lines.flush()  # the responses before this one go first
        lines.stop_idle()  # a long download is not idleness
        lines.reads.hold(BUSY)
        lines.reads.detach()  # the transfer is the transport's producer meanwhile
        self._transfer = MessageTransfer(source, lines.transport, item.status.render(), item.encoder)
        self._transfer.finished.addCallbacks(
            self._streamed, self._stream_failed, callbackArgs=(item, queue, sent)
        )
        self._transfer.start()

    def _streamed(self, octets: int, item: Retrieve, queue, sent: defer.Deferred) -> None:
        self._transfer = None
        lines = self._lines
        lines.reads.attach()
        lines.reads.release(BUSY)
        lines.restart_idle()
        self._perform(item.then(octets))
        self._send(queue, sent)

    def _stream_failed(self, failure: Failure) -> None:
        self._transfer = None
        self._close_unsent()
        if failure.check(TransferStopped):
            return  # the client went away
        emit_failure(self.log, "pop3.read_failed", "reading a message failed; closing the session",
                     failure)
        self._perform(CLOSE)
