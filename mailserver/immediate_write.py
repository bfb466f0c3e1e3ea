"""
Sending a reply as soon as it is ready.

Twisted's TCP transport never sends in C{write()}: it buffers the bytes,
asks epoll to watch the socket for writability (an C{epoll_ctl}), sends on
the reactor's next turn and then stops watching (another C{epoll_ctl}).  A
reply nearly always fits the kernel's empty send buffer, so that is two
system calls and a reactor turn per reply for nothing; asyncio's
transports send at once for the same reason.  L{write_now} sends directly when the transport holds
nothing unsent and hands Twisted whatever the kernel did not take, so the
order of bytes, the producer's pause on a full buffer and the transport's
handling of a broken connection are Twisted's own.

Every line session sends its turn's batched replies so
(L{mailserver.wire.session.LineSession.flush}: SMTP, POP3, IMAP), and the
relay client its pipelined commands and a body held in memory.  A turn's
replies still go out together: the session writes once, after handling
all the input it has (the 250 after DATA and the 221 to a QUIT sent with
the dot, in one write).  bench/README.md has the measurements.
"""

from __future__ import annotations

from errno import EAGAIN, EINTR, ENOBUFS, EWOULDBLOCK

from twisted.internet.tcp import Connection

_TRY_AGAIN = frozenset({EAGAIN, EWOULDBLOCK, EINTR, ENOBUFS})


def write_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending at once when that keeps the
    order: a plain TCP connection (not TLS, whose bytes must go through
    its own layer) that is open and holds no unsent bytes.  Anything else
    is a plain C{transport.write}.
    """
    if (
        isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _TRY_AGAIN:
                # Twisted's own write path notices the broken connection
                # and closes it as usual.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
