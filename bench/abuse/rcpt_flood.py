"""
A recipient flood: MAIL and a thousand pipelined RCPTs over one connection,
again every few seconds; the server takes C{max_recipients} and says 452 to
the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.abuse.common import HOST, error_sample
from bench.smtp_client import SMTPReplyError, connect, read_reply, reply_text
from bench.smtp_load import percentile


@dataclass
class RcptResult:
    rounds: int = 0
    codes: Counter = field(default_factory=Counter)
    per_round_ms: list[float] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def rcpt_flooder(phase) -> None:
    """
    MAIL and C{--rcpts} pipelined RCPTs, RSET, QUIT, over one connection;
    again every C{--rcpt-every} seconds.
    """
    result = phase.rcpt
    args = phase.args
    while not phase.stop_abuse.is_set():
        try:
            async with asyncio.timeout(120):
                reader, writer = await connect(HOST, phase.port, ehlo="flood.bench")
                try:
                    commands = [b"MAIL FROM:<flood@bench.test>\r\n"]
                    commands += [f"RCPT TO:<flood+{i}@localhost>\r\n".encode() for i in range(args.rcpts)]
                    commands += [b"RSET\r\n", b"QUIT\r\n"]
                    t = time.monotonic()
                    with phase.abusing("rcpt"):
                        writer.write(b"".join(commands))
                        codes = Counter()
                        accepted = 0
                        for i in range(len(commands)):
                            code, lines = await read_reply(reader)
                            if 1 <= i <= args.rcpts:
                                codes[reply_text(code, lines)[:40]] += 1
                                accepted += code == 250
                    result.per_round_ms.append((time.monotonic() - t) * 1000)
                    result.codes.update(codes)
                    result.accepted_per_round.append(accepted)
                    result.rounds += 1
                finally:
                    writer.close()
        except (TimeoutError, OSError, SMTPReplyError) as e:
            result.errors += 1
            error_sample(result.error_samples, f"t={phase.now():.1f}s {type(e).__name__}: {e}")
        try:
            await asyncio.wait_for(phase.stop_abuse.wait(), args.rcpt_every)
        except TimeoutError:
            pass


def describe_rcpt(r: RcptResult, args) -> list[str]:
    out = [
        f"RCPT flood (MAIL + {args.rcpts} RCPTs pipelined, every {args.rcpt_every:.0f}s, {args.rcpt_clients} "
        f"client(s)): {r.rounds} rounds, RCPT answers {dict(r.codes)}, accepted per round "
        f"{sorted(set(r.accepted_per_round))}, round time p50 {percentile(sorted(r.per_round_ms), 50):.1f} ms "
        f"max {max(r.per_round_ms, default=float('nan')):.1f} ms, errors {r.errors}"
    ]
    for e in r.error_samples[:3]:
        out.append(f"  error: {e}")
    return out
