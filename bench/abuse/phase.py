"""
One phase of the abuse bench: its shared state (L{Phase}) and its course
(L{run_phase}): the baseline, the slow clients' ramp, the never-readers'
flood, the measure window with the other abusers, the teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter

from bench.abuse.brute_force import BruteResult, brute_worker
from bench.abuse.common import KIND_NAMES, KINDS, short_reply
from bench.abuse.huge_header import HugeResult, huge_header
from bench.abuse.never_read import NoReadClient, finally_read, no_reader, noread_state, poll_noread
from bench.abuse.rcpt_flood import RcptResult, rcpt_flooder
from bench.abuse.sampling import fsync_probe, progress, sampler
from bench.abuse.slow_loris import SlowStats, slow_loris
from bench.abuse.system import CLK_TCK, fd_count, loadavg, own_cpu, server_sockets, system_busy_ticks, threads
from bench.abuse.well_behaved import GoodResult, Pop3Result, good_clients
from bench.peers import MailServerPeer, cpu_seconds, peak_rss_kib, rss_kib


class Phase:
    """
    Everything the clients of one phase share: the server's ports, the
    stage, when to stop, and each kind of client's results.
    """

    def __init__(self, name: str, args, port: int, pop3_port: int, pid: int) -> None:
        self.name = name
        self.args = args
        self.port = port
        self.pop3_port = pop3_port
        self.pid = pid
        self.t0 = time.monotonic()
        self.stage = "baseline"
        self.stages: list[tuple[float, str]] = [(self.t0, "baseline")]
        self.abuse_events: list[tuple[str, float, float]] = []
        self.stop_abuse = asyncio.Event()
        self.stop_good = asyncio.Event()
        self.slow = {k: SlowStats(k) for k in KINDS}
        self.good = GoodResult()
        self.pop3 = Pop3Result()
        self.brute = BruteResult()
        self.rcpt = RcptResult()
        self.huge = HugeResult()
        self.samples: list[dict] = []
        self.noread_clients: list[NoReadClient] = []
        self.noread_writing = 0
        self.fsync_probes: list[tuple[float, float, str]] = []  # (t, ms, stage)
        self.nr_seen: dict = {}  # never-reader port -> ((server end, client end), when it last changed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.stages.append((time.monotonic(), stage))

    def stage_at(self, when: float) -> str:
        stage = self.stages[0][1]
        for start, name in self.stages:
            if start <= when:
                stage = name
        return stage

    def file(self, record: dict) -> None:
        """
        A record from the well-behaved clients' process.
        """
        record["t"] = record["t0"] - self.t0
        record["stage"] = self.stage_at(record["t0"])
        if record["type"] == "pop3":
            self.pop3.sessions += 1
            if "error" in record:
                self.pop3.errors += 1
                if len(self.pop3.error_samples) < 5:
                    self.pop3.error_samples.append(f"t={record['t']:.1f}s {record['error']}")
            else:
                self.pop3.ok += 1
                self.pop3.latencies_ms.append(record["ms"])
                self.pop3.last_stat = record["stat"]
            return
        if "error" in record:
            self.good.errors += 1
            if len(self.good.error_samples) < 10:
                self.good.error_samples.append(f"t={record['t']:.1f}s ({record['stage']}) {record['error']}")
            return
        self.good.records.append(record)
        if record.get("queue_id"):
            self.good.queue_ids.append(record["queue_id"])
        if not record.get("quit_ok"):
            self.good.quit_errors += 1

    @contextlib.contextmanager
    def abusing(self, kind: str):
        """
        Note an abusive transfer's span (to tell what was going on while a
        well-behaved message was slow).
        """
        start = time.monotonic()
        try:
            yield
        finally:
            self.abuse_events.append((kind, start, time.monotonic()))

    def abuse_during(self, start: float, end: float) -> dict:
        """
        Abusive transfers (by kind) that were going on at some point within
        [start, end] (monotonic seconds).
        """
        kinds = Counter(k for k, a, b in self.abuse_events if a <= end and b >= start)
        return dict(kinds)

    def open_slow(self) -> int:
        return sum(s.live for s in self.slow.values())


async def open_slow(phase: Phase, counts: dict[str, int]) -> list[asyncio.Task]:
    """
    Start the slow clients, C{--ramp-parallel} connection attempts at a
    time, kinds interleaved; returns when every one is in position (or has
    failed).
    """
    order = [k for k in KINDS for _ in range(counts[k])]
    random.Random(1).shuffle(order)
    sem = asyncio.Semaphore(phase.args.ramp_parallel)
    tasks: list[asyncio.Task] = []

    async def one(index: int, kind: str) -> None:
        stats = phase.slow[kind]
        async with sem:
            placed = asyncio.Event()
            if kind == "noread":
                coro = no_reader(phase, stats, placed)
            else:
                coro = slow_loris(phase, stats, index, placed)
            task = asyncio.ensure_future(coro)
            task.add_done_callback(lambda _: placed.set())
            tasks.append(task)
            await placed.wait()

    for kind in order:
        phase.slow[kind].wanted += 1
    await asyncio.gather(*(one(i, k) for i, k in enumerate(order)))
    return tasks


def mix_counts(total: int, mix: dict[str, float]) -> dict[str, int]:
    weights = sum(mix.values()) or 1
    counts = {k: int(total * mix.get(k, 0) / weights) for k in KINDS}
    # Give the rounding remainder to the first kind with a weight.
    rest = total - sum(counts.values())
    for k in KINDS:
        if mix.get(k, 0) > 0:
            counts[k] += rest
            break
    return counts


async def run_phase(name: str, args, peer: MailServerPeer, slow_total: int, noread: int, hold_s: float,
                    abusers: bool, timeouts: tuple[int, int]) -> dict:
    phase = Phase(name, args, peer.port, peer.pop3_port, peer.pid)
    stop_sampling = asyncio.Event()
    background = [
        asyncio.ensure_future(sampler(phase, stop_sampling, 1.0, 5 if name == "hold" else 1)),
        asyncio.ensure_future(progress(phase, stop_sampling, args.progress_every)),
        asyncio.ensure_future(fsync_probe(phase, peer.root, stop_sampling)),
    ]
    good = [asyncio.ensure_future(good_clients(phase))]
    marks = {"command_timeout": timeouts[0], "data_timeout": timeouts[1]}
    # Baseline: the well-behaved client alone.
    await asyncio.sleep(args.baseline)
    marks["rss_before_abuse_kib"] = rss_kib(peer.pid)
    marks["fds_before_abuse"] = fd_count(peer.pid)
    marks["threads_before_abuse"] = threads(peer.pid)
    phase.set_stage("ramp")
    marks["ramp_start"] = phase.now()
    counts = mix_counts(slow_total, args.mix)
    counts["noread"] = noread
    print(f"  [{name}] opening {slow_total} slow-loris clients: "
          + ", ".join(f"{counts[k]} {KIND_NAMES[k]}" for k in ("cmd", "data")), flush=True)
    slow_tasks = await open_slow(phase, {"cmd": counts["cmd"], "data": counts["data"], "noread": 0})
    marks["ramp_s"] = phase.now() - marks["ramp_start"]
    marks["rss_loris_connected_kib"] = rss_kib(peer.pid)
    print(f"  [{name}] {phase.open_slow()} slow-loris clients in position after {marks['ramp_s']:.1f}s", flush=True)
    # The never-readers: their NOOP flood, until the server has stopped
    # reading from each (or read it all) and nothing moves any more.
    phase.set_stage("noread flood")
    t_burst = time.monotonic()
    if noread:
        print(f"  [{name}] {noread} clients pipeline {args.noops} NOOPs each and never read", flush=True)
        slow_tasks += await open_slow(phase, {"cmd": 0, "data": 0, "noread": noread})
        while time.monotonic() - t_burst < args.burst_max:
            await asyncio.sleep(1.0)
            # Settled: every never-reader has stopped writing, and neither
            # end of any of their connections moved for 3 s.
            if poll_noread(phase) >= 3.0 and phase.noread_writing == 0:
                break
    marks["burst_s"] = time.monotonic() - t_burst
    if noread:
        phase.abuse_events.append(("noread flood", t_burst, time.monotonic()))
    marks["noread_after_burst"] = noread_state(phase)
    marks["all_connected"] = phase.now()
    marks["rss_all_connected_kib"] = rss_kib(peer.pid)
    marks["threads_all_connected"] = threads(peer.pid)
    marks["open_at_start"] = phase.open_slow()
    print(f"  [{name}] {phase.open_slow()} slow clients open (flood settled after {marks['burst_s']:.1f}s); "
          f"measuring for {hold_s:.0f}s", flush=True)
    phase.set_stage("measure")
    # The other abusers run through the measure window.
    phase.brute.started = time.monotonic()
    abuse: list[asyncio.Task] = []
    if abusers:
        abuse += [asyncio.ensure_future(brute_worker(phase, w)) for w in range(args.bf_workers)]
        abuse += [asyncio.ensure_future(rcpt_flooder(phase)) for _ in range(args.rcpt_clients)]
        abuse += [asyncio.ensure_future(huge_header(phase, w)) for w in range(args.huge_clients)]
    cpu0 = cpu_seconds(peer.pid)
    own0 = own_cpu()
    busy0 = system_busy_ticks()
    t_measure = time.monotonic()
    marks["measure_start"] = t_measure
    marks["loadavg_start"] = loadavg()
    await asyncio.sleep(hold_s)
    marks["measure_end"] = time.monotonic()
    marks["measure_s"] = marks["measure_end"] - t_measure
    marks["server_cpu_s"] = cpu_seconds(peer.pid) - cpu0
    marks["loadgen_cpu_s"] = own_cpu() - own0
    marks["machine_busy_s"] = (system_busy_ticks() - busy0) / CLK_TCK
    marks["loadavg_end"] = loadavg()
    marks["open_at_end"] = phase.open_slow()
    marks["open_at_end_by_kind"] = {k: s.live for k, s in phase.slow.items()}
    marks["rss_end_kib"] = rss_kib(peer.pid)
    marks["hwm_end_kib"] = peak_rss_kib(peer.pid)
    marks["fds_end"] = fd_count(peer.pid)
    marks["threads_end"] = threads(peer.pid)
    # The server's side of the never-readers' connections, before they read.
    table = server_sockets(peer.port)
    nr = phase.slow["noread"]
    states = Counter()
    rx = []
    tx = []
    for port in nr.ports:
        entry = table.get(port)
        if entry is None:
            states["gone"] += 1
            continue
        states[entry[0]] += 1
        tx.append(entry[1])
        rx.append(entry[2])
    marks["noread_server_sockets"] = dict(states)
    marks["noread_server_tx_kib_max"] = max(tx, default=0) / 1024
    marks["noread_server_rx_kib_max"] = max(rx, default=0) / 1024
    marks["noread_server_rx_kib_min"] = min(rx, default=0) / 1024
    for kind in ("cmd", "data"):
        ks = Counter()
        for port in phase.slow[kind].ports:
            entry = table.get(port)
            ks[entry[0] if entry else "gone"] += 1
        marks[f"{kind}_server_sockets"] = dict(ks)
    # Stop the well-behaved clients and the abusers.
    phase.set_stage("teardown")
    phase.stop_good.set()
    phase.stop_abuse.set()
    await asyncio.gather(*good, return_exceptions=True)
    for t in abuse:
        t.cancel()
    await asyncio.gather(*abuse, return_exceptions=True)
    # The never-readers read at last: what had the server said?
    await asyncio.gather(*(finally_read(c, args.final_read) for c in phase.noread_clients))
    replies = Counter()
    eofs = 0
    for c in phase.noread_clients:
        text = bytes(c.received)
        replies["250 (NOOP replies)"] += text.count(b"\n250 ")
        for line in re.findall(rb"421[ -][^\r\n]*", text):
            replies[short_reply(line)] += 1
        eofs += c.eof.is_set()
    marks["noread_final"] = {"replies": dict(replies), "closed_by_server_after_reading": eofs,
                             "clients": len(phase.noread_clients),
                             "read_before_kib_max": max((c.read_while_paused for c in phase.noread_clients),
                                                        default=0) / 1024}
    for t in slow_tasks:
        t.cancel()
    await asyncio.gather(*slow_tasks, return_exceptions=True)
    # Wait (up to 60 s) for the server to have closed its side of them all:
    # it may still be working through what the never-readers had sent.
    t_close = time.monotonic()
    while fd_count(peer.pid) > marks["fds_before_abuse"] + 5 and time.monotonic() - t_close < 60:
        await asyncio.sleep(0.5)
    marks["close_s"] = time.monotonic() - t_close
    await asyncio.sleep(1)
    marks["rss_after_close_kib"] = rss_kib(peer.pid)
    marks["fds_after_close"] = fd_count(peer.pid)
    stop_sampling.set()
    await asyncio.gather(*background, return_exceptions=True)
    return {"phase": phase, "marks": marks, "counts": counts}
