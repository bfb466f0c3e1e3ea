"""
The relay benchmark's sink where Postfix's C{smtp-sink} cannot run: an
aiosmtpd server that takes every message and throws it away, printing
C{smtp-sink -c}'s running counters (C{sess=N quit=N mesg=N}, one per
change, each ended by C{\\r}) so L{bench.relay_peers.RelaySink} reads
either the same way.

    .venv/bin/python bench/relay_sink.py 127.0.0.2 2600
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP

counters = {"sess": 0, "quit": 0, "mesg": 0}


def show() -> None:
    sys.stdout.write(f"sess={counters['sess']} quit={counters['quit']} mesg={counters['mesg']}\r")
    sys.stdout.flush()


class Discard:
    async def handle_DATA(self, server, session, envelope):
        counters["mesg"] += 1
        show()
        return "250 2.0.0 Ok: discarded"

    async def handle_QUIT(self, server, session, envelope):
        counters["quit"] += 1
        return "221 2.0.0 Bye"


class CountingSMTP(SMTP):
    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        counters["sess"] += 1
        show()


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: CountingSMTP(handler, hostname="sink.test", data_size_limit=0), host, port,
        backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
