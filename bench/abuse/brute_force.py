"""
A password guesser: AUTH PLAIN for a real user with wrong passwords, a few
connections at once from one address, and how the server slows and then
refuses it (535 after the failure delay, then 454).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.abuse.common import GOOD_USER, HOST, error_sample
from bench.smtp_client import SMTPReplyError, command, greet
from bench.smtp_load import percentile


@dataclass
class BruteResult:
    attempts: list[tuple[float, int, float]] = field(default_factory=list)  # (t, code, answer delay s)
    connections: int = 0
    auth_advertised: bool | None = None
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    started: float = 0.0


async def brute_worker(phase, worker: int) -> None:
    """
    AUTH PLAIN for a real user with wrong passwords, C{--bf-per-connection}
    tries per new connection from C{--bf-source}.
    """
    result = phase.brute
    args = phase.args
    n = 0
    while not phase.stop_abuse.is_set():
        last = None
        try:
            async with asyncio.timeout(120):
                reader, writer = await asyncio.open_connection(
                    HOST, phase.port, local_addr=(args.bf_source, 0)
                )
                result.connections += 1
                try:
                    extensions = await greet(reader, writer, ehlo="guesser.bench")
                    result.auth_advertised = any(l.upper().startswith(b"AUTH") for l in extensions)
                    for _ in range(args.bf_per_connection):
                        n += 1
                        secret = f"\0{GOOD_USER}\0wrong-{worker}-{n}".encode()
                        t = time.monotonic()
                        with phase.abusing("auth"):
                            code, _ = await command(reader, writer, b"AUTH PLAIN " + base64.b64encode(secret))
                        result.attempts.append((t - result.started, code, time.monotonic() - t))
                        last = code
                        if code not in (535,):
                            break
                    writer.write(b"QUIT\r\n")
                finally:
                    writer.close()
        except (TimeoutError, OSError, SMTPReplyError) as e:
            result.errors += 1
            error_sample(result.error_samples, f"t={phase.now():.1f}s {type(e).__name__}: {e}")
            last = None
        if last != 535:
            # Refused (454) or broken: a short pause, then on again.
            try:
                await asyncio.wait_for(phase.stop_abuse.wait(), args.bf_pause)
            except TimeoutError:
                pass


def describe_brute(b: BruteResult, args) -> list[str]:
    out = []
    attempts = b.attempts
    codes = Counter(code for _, code, _ in attempts)
    out.append(
        f"brute-force AUTH (from {args.bf_source}, {args.bf_workers} connections at once, "
        f"{args.bf_per_connection} try per connection): {len(attempts)} attempts over "
        f"{b.connections} connections; answers: "
        + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
        + f"; AUTH advertised without TLS: {b.auth_advertised}; errors {b.errors}"
    )
    fails = [(t, d) for t, c, d in attempts if c == 535]
    if fails:
        delays = [d for _, d in sorted(fails)]
        out.append(
            "  535 answer delays, in order (s): " + " ".join(f"{d:.1f}" for d in delays[:30])
            + (" ..." if len(delays) > 30 else "")
        )
    refusals = sorted((t, d) for t, c, d in attempts if c == 454)
    if refusals:
        first = refusals[0][0]
        before = sum(1 for t, c, _ in attempts if c == 535 and t < first)
        out.append(
            f"  454 from t={first:.1f}s after the guesser started (after {before} failures), then every try "
            f"({len(refusals)}), answered in at most {max(d for _, d in refusals) * 1000:.1f} ms, "
            f"median {percentile(sorted(d for _, d in refusals), 50) * 1000:.1f} ms"
        )
    else:
        out.append("  no 454 yet (too few failures within the window for the limit)")
    for s in b.error_samples[:3]:
        out.append(f"  error: {s}")
    return out
