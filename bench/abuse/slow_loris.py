"""
Slow-loris clients: they connect and then send one octet every 2-5 s,
either of an endless command line ("cmd", after EHLO) or of message text
("data", after MAIL, RCPT and DATA), and note when and how the server
closes them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.abuse.common import HOST, SLOW_USER, short_reply
from bench.smtp_client import SMTPReplyError, expect, greet, reply_text


@dataclass
class SlowStats:
    """
    What happened to the slow clients of one kind (also the never-readers').
    """

    kind: str
    wanted: int = 0
    connected: int = 0
    ready: int = 0
    refused: Counter = field(default_factory=Counter)
    failed: int = 0
    closed_by_server: int = 0
    close_replies: Counter = field(default_factory=Counter)
    close_after_s: list[float] = field(default_factory=list)
    other_replies: Counter = field(default_factory=Counter)
    bytes_sent: int = 0
    error_samples: list[str] = field(default_factory=list)
    live: int = 0
    # never-readers
    noops_given: int = 0
    noops_unsent: int = 0  # still in our own write buffer (the kernel would take no more)
    blocked: int = 0  # clients whose writes stopped being taken
    ports: dict = field(default_factory=dict)  # local port -> time its deadline started
    server_closed: dict = field(default_factory=dict)  # noread: port -> s until the server's socket closed

    def error(self, text: str) -> None:
        self.failed += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:160])


async def slow_loris(phase, stats: SlowStats, index: int, placed: asyncio.Event) -> None:
    """
    Command state ("cmd"): EHLO, then an endless command line, one octet
    every 2-5 s.  DATA ("data"): MAIL, RCPT, DATA, then message text, one
    octet every 2-5 s.  Reads whatever the server says meanwhile; the first
    line it says unasked (421 ...) and the close are recorded.
    """
    lo, hi = phase.args.byte_interval
    writer = None
    ready = False
    try:
        try:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection(HOST, phase.port, limit=1 << 16)
                stats.connected += 1
                try:
                    await greet(reader, writer, ehlo=f"slow{index}.bench")
                except SMTPReplyError as e:
                    if e.step == "greeting" and e.code is not None:
                        stats.refused[reply_text(e.code, e.lines)] += 1
                    else:
                        stats.error(str(e))
                    return
                if stats.kind == "data":
                    writer.write(f"MAIL FROM:<slow{index}@bench.test>\r\nRCPT TO:<{SLOW_USER}>\r\nDATA\r\n".encode())
                    for wanted, step in ((250, "MAIL"), (250, "RCPT"), (354, "DATA")):
                        await expect(reader, wanted, step)
        except (TimeoutError, OSError, SMTPReplyError) as e:
            stats.error(f"{type(e).__name__}: {e}")
            return
        mark = time.monotonic()  # the deadline for the line (or the text) starts here
        stats.ports[writer.get_extra_info("sockname")[1]] = mark
        stats.ready += 1
        stats.live += 1
        ready = True
        placed.set()
        if stats.kind == "cmd":
            text = b"NOOP " + b"z" * 100_000  # never ends in time
        else:
            text = (b"X-Slow: " + b"s" * 60 + b"\r\n") * 2000
        position = 0
        while True:
            try:
                async with asyncio.timeout(random.uniform(lo, hi)):
                    line = await reader.readline()
            except TimeoutError:
                writer.write(text[position : position + 1])
                position = (position + 1) % len(text)
                stats.bytes_sent += 1
                continue
            if line and not line.startswith(b"421"):
                stats.other_replies[short_reply(line)] += 1
                continue
            stats.closed_by_server += 1
            stats.close_after_s.append(time.monotonic() - mark)
            stats.close_replies[short_reply(line) if line else "(closed without a reply)"] += 1
            return
    except OSError as e:  # reset by the server
        if ready:
            stats.closed_by_server += 1
            stats.close_after_s.append(time.monotonic() - mark)
            stats.close_replies[f"({type(e).__name__})"] += 1
        else:
            stats.error(f"{type(e).__name__}: {e}")
    finally:
        if ready:
            stats.live -= 1
        if writer is not None:
            writer.close()
