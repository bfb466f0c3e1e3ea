"""
Never-readers: clients that connect, never read a reply (not even the
greeting) and pipeline NOOPs until the kernel takes no more; and what both
ends of their connections look like meanwhile, from /proc/net/tcp.
"""

from __future__ import annotations

import asyncio
import time

from bench.abuse.common import HOST, MiB
from bench.abuse.slow_loris import SlowStats
from bench.abuse.system import tcp_table


class NoReadClient(asyncio.Protocol):
    """
    Connects, stops reading at once (not even the greeting), and writes
    NOOPs until the kernel takes no more.
    """

    def __init__(self, phase, stats: SlowStats) -> None:
        self.phase = phase
        self.stats = stats
        self.transport = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.lost = False
        self.port = 0
        self.read_while_paused = 0
        self.written = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        self.port = transport.get_extra_info("sockname")[1]

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) > 64 * MiB:
            self.received = self.received[-MiB:]

    def eof_received(self):
        self.eof.set()
        return False

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.eof.set()


async def no_reader(phase, stats: SlowStats, placed: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    client = NoReadClient(phase, stats)
    try:
        async with asyncio.timeout(60):
            await loop.create_connection(lambda: client, HOST, phase.port)
    except (TimeoutError, OSError) as e:
        stats.error(f"{type(e).__name__}: {e}")
        return
    # uvloop starts reading after connection_made() even if it paused: pause
    # (again) here.  Only the greeting can have been read by now.
    client.transport.pause_reading()
    stats.connected += 1
    stats.ready += 1
    stats.live += 1
    stats.ports[client.port] = time.monotonic()
    phase.noread_clients.append(client)
    placed.set()
    chunk = b"NOOP\r\n" * 1000
    given = 0
    phase.noread_writing += 1
    writing = True
    try:
        while given < phase.args.noops and not client.lost:
            client.transport.write(chunk)
            given += 1000
            client.written += len(chunk)
            try:
                async with asyncio.timeout(5):
                    await client.can_write.wait()
            except TimeoutError:
                stats.blocked += 1
                break
        stats.noops_given += given
        phase.noread_writing -= 1
        writing = False
        # Hold the connection, reading nothing, until the phase ends.
        await asyncio.Event().wait()
    finally:
        if writing:
            phase.noread_writing -= 1
        if client.transport is not None:
            stats.noops_unsent += client.transport.get_write_buffer_size() // 6
            client.transport.abort()
        stats.live -= 1


async def finally_read(client: NoReadClient, seconds: float) -> None:
    """
    At the end: read what the server had sent, for up to C{seconds}.
    """
    if client.transport is None or client.lost:
        return
    client.read_while_paused = len(client.received)
    client.transport.resume_reading()
    try:
        async with asyncio.timeout(seconds):
            await client.eof.wait()
    except TimeoutError:
        pass


def poll_noread(phase) -> float:
    """
    Look at both ends of every never-reader's connection; note when the
    server's end closed, and when anything last moved.  Returns the
    seconds since anything moved on any of them.
    """
    nr = phase.slow["noread"]
    if not nr.ports:
        return float("inf")
    table = tcp_table(phase.port)
    now = time.monotonic()
    for port, started in nr.ports.items():
        server = table.get((phase.port, port))
        client = table.get((port, phase.port))
        if (
            phase.stage != "teardown"  # not once they read at last
            and port not in nr.server_closed
            and (server is None or server[0] != "ESTABLISHED")
        ):
            nr.server_closed[port] = now - started
        key = (server, client)
        seen = phase.nr_seen.get(port)
        if seen is None or seen[0] != key:
            phase.nr_seen[port] = (key, now)
    return now - max(changed for _, changed in phase.nr_seen.values())


def noread_state(phase) -> dict:
    """
    For the never-readers: how many NOOPs the server has taken from each
    (written, less what waits in our buffer, in our kernel and unread in
    the server's kernel), and whether it has stopped reading.
    """
    nr = phase.slow["noread"]
    table = tcp_table(phase.port)
    taken = []
    stopped = 0
    replies_queued = []
    for c in phase.noread_clients:
        server = table.get((phase.port, c.port))
        client = table.get((c.port, phase.port))
        if server is None or client is None or c.transport is None:
            continue
        waiting = c.transport.get_write_buffer_size() + client[1] + server[2]
        taken.append(max(0, c.written - waiting) // 6)
        stopped += server[2] > 0
        replies_queued.append(server[1] + client[2])
    return {
        "clients": len(phase.noread_clients),
        "server_stopped_reading": stopped,
        "noops_taken_min": min(taken, default=0),
        "noops_taken_max": max(taken, default=0),
        "replies_queued_kib_max": max(replies_queued, default=0) / 1024,
        "closed_by_server": len(nr.server_closed),
    }
