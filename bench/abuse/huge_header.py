"""
Huge headers: DATA with megabytes of header lines and no blank line, ended
by the final dot; how long the server takes to answer, and what.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.abuse.common import HOST, SINK_USER, MiB, error_sample
from bench.smtp_client import SMTPReplyError, connect, expect, read_reply, reply_text
from bench.smtp_load import percentile


@dataclass
class HugeResult:
    sent_octets: list[int] = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)
    transfer_s: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def huge_header(phase, worker: int) -> None:
    """
    DATA with C{--huge-mb} MiB of header lines and no blank line, ended by
    the final dot; the reply is recorded.  Again every C{--huge-every} s.
    """
    result = phase.huge
    args = phase.args
    block = b"".join(
        b"X-Huge-%06d: %s\r\n" % (i, b"h" * 80) for i in range(600)
    )  # ~59 KiB of header lines
    total = int(args.huge_mb * MiB)
    while not phase.stop_abuse.is_set():
        try:
            async with asyncio.timeout(300):
                reader, writer = await connect(HOST, phase.port, ehlo="huge.bench")
                try:
                    writer.write(f"MAIL FROM:<huge{worker}@bench.test>\r\nRCPT TO:<{SINK_USER}>\r\nDATA\r\n".encode())
                    for wanted, step in ((250, "MAIL"), (250, "RCPT"), (354, "DATA")):
                        await expect(reader, wanted, step)
                    with phase.abusing("huge"):
                        t = time.monotonic()
                        sent = 0
                        while sent < total:
                            writer.write(block)
                            sent += len(block)
                            await writer.drain()
                        writer.write(b".\r\n")
                        t_end = time.monotonic()
                        code, lines = await read_reply(reader)
                    result.sent_octets.append(sent)
                    result.transfer_s.append(t_end - t)
                    result.answer_ms.append((time.monotonic() - t_end) * 1000)
                    result.replies[reply_text(code, lines)[:60].split(" queued as")[0]] += 1
                    writer.write(b"QUIT\r\n")
                finally:
                    writer.close()
        except (TimeoutError, OSError, SMTPReplyError) as e:
            result.errors += 1
            error_sample(result.error_samples, f"t={phase.now():.1f}s {type(e).__name__}: {e}")
        try:
            await asyncio.wait_for(phase.stop_abuse.wait(), args.huge_every)
        except TimeoutError:
            pass


def describe_huge(h: HugeResult, args) -> list[str]:
    out = [
        f"huge header ({args.huge_mb:g} MiB of header lines, no blank line, {args.huge_clients} client(s), every "
        f"{args.huge_every:.0f}s): {len(h.sent_octets)} sent, answers {dict(h.replies)}, transfer p50 "
        f"{percentile(sorted(h.transfer_s), 50):.2f}s, answer after the dot p50 "
        f"{percentile(sorted(h.answer_ms), 50):.0f} ms max {max(h.answer_ms, default=float('nan')):.0f} ms, "
        f"errors {h.errors}"
    ]
    for e in h.error_samples[:3]:
        out.append(f"  error: {e}")
    return out
