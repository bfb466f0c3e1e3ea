"""
Memory per idle SMTP connection: open N connections to a server, read each
one's 220 greeting, hold them all open, and compare the server's resident
memory (VmRSS, its whole session) before and after.

Before the baseline is taken, a warm-up round opens and closes a batch of
connections, so lazy imports and first-use allocations are not charged to
the idle connections.  The figure is (RSS with N open - RSS before) / N.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bench.peers import rss_kib
from bench.smtp_load import run_async

MAX_CONNECTIONS = 10_000


@dataclass
class IdleResult:
    wanted: int
    opened: int = 0
    failed: int = 0
    rss_before_kib: int = 0
    rss_with_kib: int = 0
    rss_after_close_kib: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def kib_per_connection(self) -> float:
        if not self.opened:
            return float("nan")
        return (self.rss_with_kib - self.rss_before_kib) / self.opened

    def __str__(self) -> str:
        return (
            f"{self.opened}/{self.wanted} idle connections: RSS {self.rss_before_kib} -> "
            f"{self.rss_with_kib} KiB = {self.kib_per_connection:.2f} KiB/connection "
            f"(after closing: {self.rss_after_close_kib} KiB), failed {self.failed}"
            f"{' (e.g. ' + self.error_samples[0] + ')' if self.error_samples else ''}"
        )


async def _open(port: int, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except BaseException:
        writer.close()
        raise
    if not line.startswith(b"220"):
        writer.close()
        raise OSError(f"greeting {line[:80]!r}")
    return writer


async def _open_many(port: int, n: int, timeout: float, result: IdleResult | None, parallel: int = 64):
    sem = asyncio.Semaphore(parallel)
    writers = []

    async def one():
        async with sem:
            try:
                writers.append(await _open(port, timeout))
            except (TimeoutError, OSError) as e:
                if result is not None:
                    result.failed += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{type(e).__name__}: {e}"[:200])

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout * 4 + n * 0.05)
    return writers


async def _close_all(writers) -> None:
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


async def idle_memory_async(
    port: int, pid: int, n: int = 1000, settle_s: float = 1.0, timeout: float = 30.0
) -> IdleResult:
    n = min(n, MAX_CONNECTIONS)
    result = IdleResult(wanted=n)
    # Warm-up: the server's first connections pay for imports and caches.
    await _close_all(await _open_many(port, min(100, n), timeout, None))
    await asyncio.sleep(settle_s)
    result.rss_before_kib = rss_kib(pid)
    writers = []
    try:
        writers = await _open_many(port, n, timeout, result)
        result.opened = len(writers)
        await asyncio.sleep(settle_s)
        result.rss_with_kib = rss_kib(pid)
    finally:
        await _close_all(writers)
    await asyncio.sleep(settle_s)
    result.rss_after_close_kib = rss_kib(pid)
    return result


def idle_memory(port: int, pid: int, n: int = 1000, **kwargs) -> IdleResult:
    return run_async(idle_memory_async(port, pid, n, **kwargs))
