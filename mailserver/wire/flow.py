"""
Reading from a client no faster than it reads our replies.

A client that pipelines commands and never reads the answers would make us
buffer replies without end; one that floods us while a command is being
handled would make us buffer its input.  L{ReadControl} keeps both bounded:
while our replies pile up unread the protocol handles no more commands
(L{ReadControl.writable} is false), and while the protocol holds more input
than it will buffer, or is busy with a command, the socket is not read at
all, so the kernel's window pushes back on the client.

It is registered as the transport's streaming producer: Twisted pauses it
when the transport's write buffer passes its high-water mark and resumes it
once the buffer has drained, which is exactly "the client is not reading".
That pause does not itself stop reading: a TLS transport pauses its
producer during the handshake too, which needs the client's next bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

INPUT = "input"  # the client sent more than we hold while we cannot go on
BUSY = "busy"  # a command is being handled (a login, a download)


@implementer(IPushProducer)
class ReadControl:
    """
    @param on_writable: called when the client has read what was piling up,
        so the protocol can go on with the commands it has buffered.
    """

    def __init__(self, transport, on_writable: Callable[[], None]) -> None:
        self._transport = transport
        self._on_writable = on_writable
        self._reasons: set[str] = set()
        self._attached = False
        self.writable = True

    def attach(self) -> None:
        """
        Become the transport's producer (again, after another one, such as
        a download, was).
        """
        if not self._attached:
            self._transport.registerProducer(self, True)
            self._attached = True

    def detach(self) -> None:
        """
        Make room for another producer, or let the connection close (a
        transport waits for its producer to unregister before it does).
        """
        if self._attached:
            self._transport.unregisterProducer()
            self._attached = False
        self.writable = True

    def closing(self) -> None:
        """
        The protocol is closing the connection: unregister (a transport
        waits for its producer before it closes) and read again, so the
        close completes (a TLS close waits for the client's close alert).
        """
        self.detach()
        if self._reasons:
            self._reasons.clear()
            self._transport.resumeProducing()

    def held(self, reason: str) -> bool:
        return reason in self._reasons

    def hold(self, reason: str) -> None:
        """
        Stop reading from the socket until every reason is released.
        """
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._transport.resumeProducing()

    # IPushProducer, called by the transport.

    def pauseProducing(self) -> None:
        self.writable = False

    def resumeProducing(self) -> None:
        if not self.writable:
            self.writable = True
            self._on_writable()

    def stopProducing(self) -> None:
        self.writable = True
