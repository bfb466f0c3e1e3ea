"""
write_now over real loopback TCP connections: sent at once when nothing is
queued, in order behind what is, and a plain write on other transports.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailserver.immediate_write import write_now

BIG = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than loopback buffers hold


class Writer(Protocol):
    def __init__(self, chunks: list[bytes], queued: list[int], done: Deferred) -> None:
        self.chunks = chunks
        self.queued = queued
        self.done = done

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            write_now(self.transport, chunk)
            self.queued.append(len(self.transport.dataBuffer) + self.transport._tempDataLen)
        self.transport.loseConnection()
        self.done.callback(None)


def read_all(address) -> bytes:
    with socket.create_connection(address, timeout=10) as client:
        received = []
        while chunk := client.recv(65536):
            received.append(chunk)
        return b"".join(received)


class WriteNowTests(unittest.TestCase):
    def serve(self, chunks: list[bytes]) -> tuple[list[int], Deferred, tuple]:
        queued: list[int] = []
        done: Deferred = Deferred()
        factory = ServerFactory.forProtocol(lambda: Writer(chunks, queued, done))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return queued, done, ("127.0.0.1", port.getHost().port)

    async def test_small_reply_is_sent_before_the_reactor_turns(self):
        queued, done, address = self.serve([b"220 ready\r\n", b"250 ok\r\n"])
        received = deferToThread(read_all, address)
        await done
        self.assertEqual(queued, [0, 0])  # nothing left for Twisted to send
        self.assertEqual(await received, b"220 ready\r\n250 ok\r\n")

    async def test_what_the_kernel_does_not_take_goes_first(self):
        queued, done, address = self.serve([BIG, b"END"])
        received = deferToThread(read_all, address)
        await done
        self.assertGreater(queued[0], 0)  # the kernel took only part of it
        self.assertEqual(queued[1], queued[0] + 3)  # queued behind, not sent
        data = await received
        self.assertEqual(len(data), len(BIG) + 3)
        self.assertTrue(data == BIG + b"END")

    def test_other_transports_get_a_plain_write(self):
        transport = StringTransport()
        write_now(transport, b"+OK\r\n")
        self.assertEqual(transport.value(), b"+OK\r\n")
