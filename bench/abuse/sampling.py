"""
What the abuse bench samples while a phase runs: the server's memory, CPU,
files and sockets every second, a timed fsync on the server's file system,
and a progress line now and then.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

from bench.abuse.common import stats_ms
from bench.abuse.never_read import poll_noread
from bench.abuse.system import (
    CLK_TCK,
    dirty_kib,
    fd_count,
    loadavg,
    own_cpu,
    server_sockets,
    system_busy_ticks,
)
from bench.peers import cpu_seconds, rss_kib


async def sampler(phase, stop: asyncio.Event, every: float = 1.0, sockets_every: int = 5) -> None:
    pid = phase.pid
    last_cpu = cpu_seconds(pid)
    last_own = own_cpu()
    last_busy = system_busy_ticks()
    last_t = time.monotonic()
    i = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
        now = time.monotonic()
        cpu = cpu_seconds(pid)
        mine = own_cpu()
        busy = system_busy_ticks()
        span = now - last_t
        sample = {
            "t": round(phase.now(), 2),
            "stage": phase.stage,
            "rss_kib": rss_kib(pid),
            "server_cores": (cpu - last_cpu) / span,
            "loadgen_cores": (mine - last_own) / span,
            "machine_cores": (busy - last_busy) / CLK_TCK / span,
            "open_slow": phase.open_slow(),
            "fds": fd_count(pid),
            "dirty_kib": dirty_kib(),
            "loadavg": loadavg(),
        }
        if i % sockets_every == 0:
            table = server_sockets(phase.port)
            sample["server_sockets"] = dict(Counter(s for s, _, _ in table.values()))
            poll_noread(phase)
        phase.samples.append(sample)
        last_cpu, last_own, last_busy, last_t = cpu, mine, busy, now
        i += 1


def _fsync_once(path: Path) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"p" * 1024)
        os.fsync(fd)
    finally:
        os.close(fd)
    return (time.perf_counter() - t) * 1000


async def fsync_probe(phase, folder: Path, stop: asyncio.Event, every: float = 1.0) -> None:
    """
    Once a second, in a thread: write 1 KiB and fsync it, on the server's
    file system, timed.  A slow disk (other jobs on the machine) shows here
    and explains a slow 250 after DATA, which waits for the server's fsync.
    """
    loop = asyncio.get_running_loop()
    path = folder / "fsync-probe"
    while not stop.is_set():
        t = phase.now()
        try:
            ms = await loop.run_in_executor(None, _fsync_once, path)
        except OSError:
            return
        phase.fsync_probes.append((t, ms, phase.stage))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def dirty_near(phase, start: float, end: float) -> float:
    """
    The most dirty page cache (MiB) sampled within a second of [start, end].
    """
    values = [x["dirty_kib"] for x in phase.samples if start - 1 <= x["t"] <= end + 1]
    return max(values, default=0) / 1024


def probes_near(phase, start: float, end: float) -> float:
    """
    The slowest fsync probe running at some point within [start, end].
    """
    worst = 0.0
    for t, ms, _ in phase.fsync_probes:
        if t <= end and t + ms / 1000 >= start:
            worst = max(worst, ms)
    return worst


async def progress(phase, stop: asyncio.Event, every: float) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
        if not phase.samples:
            continue
        s = phase.samples[-1]
        recent = [r["ms"] for r in phase.good.records if r["t"] > phase.now() - every]
        lat = stats_ms(recent)
        print(
            f"  [{phase.name} t={s['t']:.0f}s {phase.stage}] slow open {s['open_slow']}, "
            f"server RSS {s['rss_kib'] / 1024:.1f} MiB, server {s['server_cores']:.2f} cores, "
            f"fds {s['fds']}, good last {every:.0f}s: {lat['n']} msgs p50 {lat['p50']:.1f} max {lat['max']:.1f} ms, "
            f"errors {phase.good.errors}, auth tries {len(phase.brute.attempts)}, loadavg {s['loadavg']}",
            flush=True,
        )
