"""
Abuse load test (hand-run, never part of the test suite): our server under
thousands of slow and hostile clients while a well-behaved client keeps
sending mail, with the well-behaved latency, the server's memory and CPU,
and what the server did to each kind of abuser.

    .venv/bin/python bench/abuse.py            # 2,000 slow-loris + 20 never-readers, 120 s; then the shedding phase
    .venv/bin/python bench/abuse.py --quick    # 500 + 5, 45 s; smaller shedding phase (about 2 minutes)
    .venv/bin/python bench/abuse.py --help     # counts, mix, durations, timeouts

Phase "hold": our server (L{bench.peers.MailServerPeer}: loopback, a
temporary data folder, the users bob, slow, flood and sink @localhost) with
C{limits.max_connections} and C{max_connections_per_client} raised so every
connection from 127.0.0.1 is admitted, otherwise its defaults
(C{smtp_command_timeout} 300 s, C{smtp_data_timeout} 600 s: the slow
clients stay connected while we measure, unless C{--command-timeout} /
C{--data-timeout} say otherwise).  Stages:

 1. baseline: the well-behaved clients alone (C{--baseline} s);
 2. ramp: C{--slow} slow-loris clients connect (C{--mix}): half in command
    state (EHLO, then an endless command line, one octet every 2-5 s), half
    in DATA (MAIL, RCPT, DATA, then message text, one octet every 2-5 s);
 3. noread flood: C{--noread} clients connect, pipeline C{--noops} NOOPs
    each and never read a reply (not even the greeting); the stage ends
    when nothing moves on their connections any more (the server has
    stopped reading from them, or read it all);
 4. measure (C{--duration} s), with everyone above still connected, plus:
    a brute-force AUTH guesser (AUTH PLAIN, wrong passwords for a real user,
    one try per new connection, C{--bf-workers} connections at once, all
    from C{--bf-source}; loopback, where the server allows AUTH without
    TLS), RCPT floods (MAIL + 1,000 pipelined RCPTs: the server takes
    C{max_recipients}, 100, then says 452) and huge headers (DATA with
    C{--huge-mb} MiB of header lines and no blank line).

Throughout, in a process of its own (so the load generator's busy event
loop does not add to what it measures): the well-behaved client sends a
1 KiB message to bob@localhost every ~100 ms, each over a new connection
(connect, EHLO, MAIL, RCPT, DATA, QUIT), timing connect() to the 250 after
the message and each step on the way; a POP3 client logs in and STATs every
few seconds.  Every second: the server's RSS (VmRSS of its session) and CPU,
its open files and threads, the machine's CPU and dirty page cache, a timed
1 KiB fsync on the same file system.

Phase "shed" (skipped with C{--no-shed}): a fresh server with small
C{smtp_command_timeout} / C{smtp_data_timeout}, C{--shed-slow} slow-loris
and C{--shed-noread} never-readers, and a check that the server closes each
of them with 421 4.4.2 when its deadline passes, and not before.

After each phase: every message the well-behaved client had accepted is
looked up (by the queue id in its 250) in bob's Maildir, and the server's
log is scanned for warnings, errors and tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import MailServerPeer, cpu_seconds, peak_rss_kib, rss_kib
from bench.smtp_load import loop_kind, make_body, new_event_loop, percentile

HOST = "127.0.0.1"
GOOD_USER = "bob@localhost"
SLOW_USER = "slow@localhost"
FLOOD_USER = "flood@localhost"
SINK_USER = "sink@localhost"
USERS = (GOOD_USER, SLOW_USER, FLOOD_USER, SINK_USER)
PASSWORD = "bench-password"
KINDS = ("cmd", "data", "noread")
KIND_NAMES = {
    "cmd": "slow-loris, command line",
    "data": "slow-loris, in DATA",
    "noread": "never reads replies",
}
TARGET_MS = 50.0
MiB = 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Hard bounds, whatever is asked.
MAX_SLOW = 15_000
MAX_DURATION = 3600.0


def raise_nofile() -> tuple[int, int]:
    """
    Raise this process's open-file limit to its hard limit (each slow
    client is a socket); returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def system_busy_ticks() -> int:
    """
    Busy clock ticks of the whole machine so far (user nice system irq
    softirq), from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values[i] for i in (0, 1, 2, 5, 6))


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def dirty_kib() -> int:
    """
    Dirty page cache of the whole machine (/proc/meminfo): what a
    C{syncfs} of the root file system may have to write first.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Dirty:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}


def tcp_table(server_port: int) -> dict[tuple[int, int], tuple[str, int, int]]:
    """
    Both ends of every TCP connection to C{server_port}, from /proc/net/tcp:
    (local port, remote port) -> (state, tx_queue, rx_queue), the queues
    being octets that end's kernel holds unsent or unacknowledged / not yet
    read by its program.  The server's end of a connection from client
    port P is (server_port, P); the client's end is (P, server_port).
    """
    table: dict[tuple[int, int], tuple[str, int, int]] = {}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                if server_port not in (local, remote) or parts[3] == "0A":
                    continue
                tx, rx = (int(x, 16) for x in parts[4].split(":"))
                table[(local, remote)] = (TCP_STATES.get(parts[3], parts[3]), tx, rx)
    except OSError:
        pass
    return table


def server_sockets(server_port: int) -> dict[int, tuple[str, int, int]]:
    """
    The server's end of each connection: client port -> (state, tx, rx).
    """
    return {r: v for (l, r), v in tcp_table(server_port).items() if l == server_port}


def stats_ms(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else float("nan"),
        "over_target": sum(1 for v in ordered if v > TARGET_MS),
    }


def fmt_ms(s: dict) -> str:
    return (
        f"{s['n']} msgs, p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms, "
        f"over {TARGET_MS:.0f} ms: {s['over_target']}"
    )


class SMTPReplyError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """
    One SMTP reply: its code and its lines (without the code).
    """
    lines = []
    for _ in range(200):
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise SMTPReplyError(f"connection closed after {lines!r} {line[:80]!r}")
        if len(line) < 4 or not line[:3].isdigit():
            raise SMTPReplyError(f"malformed reply line {line[:80]!r}")
        lines.append(line[4:].rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return int(line[:3]), lines
    raise SMTPReplyError("reply too long")


def reply_text(code: int, lines: list[bytes]) -> str:
    return f"{code} {lines[-1].decode('ascii', 'replace') if lines else ''}"[:90]


def short_reply(line: bytes) -> str:
    """
    A reply line without the host name and details: "421 4.4.2 ... timeout exceeded".
    """
    text = line.decode("ascii", "replace").strip()
    return re.sub(r"mx\.test ", "", text)[:80]


# Shared state of one phase.


@dataclass
class SlowStats:
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


@dataclass
class GoodResult:
    records: list[dict] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    queue_ids: list[str] = field(default_factory=list)
    quit_errors: int = 0


@dataclass
class Pop3Result:
    sessions: int = 0
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_stat: str = ""
    error_samples: list[str] = field(default_factory=list)


@dataclass
class BruteResult:
    attempts: list[tuple[float, int, float]] = field(default_factory=list)  # (t, code, answer delay s)
    connections: int = 0
    auth_advertised: bool | None = None
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    started: float = 0.0


@dataclass
class RcptResult:
    rounds: int = 0
    codes: Counter = field(default_factory=Counter)
    per_round_ms: list[float] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


@dataclass
class HugeResult:
    sent_octets: list[int] = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)
    transfer_s: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


class Phase:
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


# The well-behaved clients, in a process of their own so that the load
# generator's busy event loop (thousands of slow clients, the floods) does
# not add to the latency they measure.


async def good_message(port: int, size: int, seq: int) -> dict:
    """
    One message on a new connection; latency from the start of connect()
    to the 250 after the message, with the time of each step.
    """
    body = make_body(size, seq, "good@bench.test", GOOD_USER)
    record = {"type": "smtp", "t0": time.monotonic()}
    t0 = time.perf_counter()
    marks = {}
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            marks["connect"] = time.perf_counter()
            code, lines = await read_reply(reader)
            if code != 220:
                raise SMTPReplyError(f"greeting {reply_text(code, lines)}")
            marks["greeting"] = time.perf_counter()
            writer.write(b"EHLO good.bench\r\n")
            code, lines = await read_reply(reader)
            if code != 250:
                raise SMTPReplyError(f"EHLO {reply_text(code, lines)}")
            marks["ehlo"] = time.perf_counter()
            writer.write(
                f"MAIL FROM:<good@bench.test> SIZE={len(body)}\r\nRCPT TO:<{GOOD_USER}>\r\nDATA\r\n".encode()
            )
            for wanted, step in ((250, "MAIL"), (250, "RCPT"), (354, "DATA")):
                code, lines = await read_reply(reader)
                if code != wanted:
                    raise SMTPReplyError(f"{step} {reply_text(code, lines)}")
            marks["354"] = time.perf_counter()
            writer.write(body + b".\r\n")
            code, lines = await read_reply(reader)
            if code != 250:
                raise SMTPReplyError(f"end of DATA {reply_text(code, lines)}")
            marks["250"] = time.perf_counter()
            text = lines[-1].decode("ascii", "replace")
            record["queue_id"] = text.rsplit(" ", 1)[-1] if "queued as" in text else None
            try:
                writer.write(b"QUIT\r\n")
                code, _ = await read_reply(reader)
                record["quit_ok"] = code == 221
            except (OSError, SMTPReplyError):
                record["quit_ok"] = False
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
    record["ms"] = (marks["250"] - t0) * 1000
    previous = t0
    steps = {}
    for name, at in marks.items():
        steps[name] = round((at - previous) * 1000, 2)
        previous = at
    record["steps"] = steps
    return record


async def good_smtp_loop(port: int, size: int, interval: float, stop: asyncio.Event, emit) -> None:
    """
    A message every C{interval} seconds (or right after the previous one,
    if it took longer), one at a time.
    """
    next_at = time.monotonic()
    seq = 0
    while not stop.is_set():
        seq += 1
        t0 = time.monotonic()
        try:
            emit(await good_message(port, size, seq))
        except (TimeoutError, OSError, SMTPReplyError, KeyError) as e:
            emit({"type": "smtp", "t0": t0, "error": f"{type(e).__name__}: {e}"[:200]})
        next_at = max(next_at + interval, time.monotonic())
        try:
            await asyncio.wait_for(stop.wait(), next_at - time.monotonic())
        except TimeoutError:
            pass


async def good_pop3_loop(port: int, every: float, stop: asyncio.Event, emit) -> None:
    """
    Every few seconds: USER/PASS, STAT, QUIT.  The first two sessions are
    a second apart, so that the server's one-time costs of password checks
    (a thread-pool thread keeps its ~16 MiB scrypt buffer from its second
    check on) fall into the baseline, not into the figures for the slow
    clients.
    """
    sessions = 0
    while not stop.is_set():
        sessions += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection(HOST, port)
                try:
                    answer = b""
                    for command in (None, f"USER {GOOD_USER}", f"PASS {PASSWORD}", "STAT"):
                        if command is not None:
                            writer.write(command.encode() + b"\r\n")
                        answer = await reader.readline()
                        if not answer.startswith(b"+OK"):
                            raise SMTPReplyError(f"{(command or 'greeting').split()[0]}: {answer[:80]!r}")
                    emit({"type": "pop3", "t0": t0, "ms": (time.monotonic() - t0) * 1000,
                          "stat": answer.decode("ascii", "replace").strip()})
                    writer.write(b"QUIT\r\n")
                    await reader.readline()
                finally:
                    writer.close()
        except (TimeoutError, OSError, SMTPReplyError) as e:
            emit({"type": "pop3", "t0": t0, "error": f"{type(e).__name__}: {e}"[:200]})
        try:
            await asyncio.wait_for(stop.wait(), 1.0 if sessions == 1 else every)
        except TimeoutError:
            pass


async def good_child_main(config: dict) -> None:
    """
    The well-behaved clients' process: runs until its stdin is closed,
    one JSON line on stdout per message or POP3 session.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch_stdin():
        await reader.read()
        stop.set()

    def emit(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    tasks = [asyncio.ensure_future(watch_stdin()),
             asyncio.ensure_future(good_smtp_loop(config["port"], config["size"], config["interval"], stop, emit))]
    if config["pop3_every"] > 0:
        tasks.append(asyncio.ensure_future(good_pop3_loop(config["pop3_port"], config["pop3_every"], stop, emit)))
    await asyncio.gather(*tasks)


async def good_clients(phase: Phase) -> None:
    """
    Start the well-behaved clients' process, file its records as they
    come, and stop it when the phase says so.
    """
    config = {"port": phase.port, "pop3_port": phase.pop3_port, "size": phase.args.size,
              "interval": phase.args.interval, "pop3_every": phase.args.pop3_every}
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--good-child", json.dumps(config),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )

    async def stopper():
        await phase.stop_good.wait()
        child.stdin.close()

    stopping = asyncio.ensure_future(stopper())
    try:
        async for line in child.stdout:
            phase.file(json.loads(line))
    finally:
        stopping.cancel()
        if child.returncode is None:
            try:
                await asyncio.wait_for(child.wait(), 60)
            except TimeoutError:
                child.kill()
                await child.wait()


# Slow clients.


async def slow_loris(phase: Phase, stats: SlowStats, index: int, placed: asyncio.Event) -> None:
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
                code, lines = await read_reply(reader)
                if code != 220:
                    stats.refused[reply_text(code, lines)] += 1
                    return
                writer.write(f"EHLO slow{index}.bench\r\n".encode())
                code, lines = await read_reply(reader)
                if code != 250:
                    stats.error(f"EHLO {reply_text(code, lines)}")
                    return
                if stats.kind == "data":
                    writer.write(f"MAIL FROM:<slow{index}@bench.test>\r\nRCPT TO:<{SLOW_USER}>\r\nDATA\r\n".encode())
                    for wanted in (250, 250, 354):
                        code, lines = await read_reply(reader)
                        if code != wanted:
                            stats.error(f"MAIL/RCPT/DATA {reply_text(code, lines)}")
                            return
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


class NoReadClient(asyncio.Protocol):
    """
    Connects, stops reading at once (not even the greeting), and writes
    NOOPs until the kernel takes no more.
    """

    def __init__(self, phase: Phase, stats: SlowStats) -> None:
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


async def no_reader(phase: Phase, stats: SlowStats, placed: asyncio.Event) -> None:
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


# The other abusers.


async def brute_worker(phase: Phase, worker: int) -> None:
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
                    code, lines = await read_reply(reader)
                    if code != 220:
                        raise SMTPReplyError(f"greeting {reply_text(code, lines)}")
                    writer.write(b"EHLO guesser.bench\r\n")
                    code, lines = await read_reply(reader)
                    result.auth_advertised = any(l.upper().startswith(b"AUTH") for l in lines)
                    for _ in range(args.bf_per_connection):
                        n += 1
                        secret = f"\0{GOOD_USER}\0wrong-{worker}-{n}".encode()
                        t = time.monotonic()
                        with phase.abusing("auth"):
                            writer.write(b"AUTH PLAIN " + base64.b64encode(secret) + b"\r\n")
                            code, lines = await read_reply(reader)
                        result.attempts.append((t - result.started, code, time.monotonic() - t))
                        last = code
                        if code not in (535,):
                            break
                    writer.write(b"QUIT\r\n")
                finally:
                    writer.close()
        except (TimeoutError, OSError, SMTPReplyError) as e:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"t={phase.now():.1f}s {type(e).__name__}: {e}"[:200])
            last = None
        if last != 535:
            # Refused (454) or broken: a short pause, then on again.
            try:
                await asyncio.wait_for(phase.stop_abuse.wait(), args.bf_pause)
            except TimeoutError:
                pass


async def rcpt_flooder(phase: Phase) -> None:
    """
    MAIL and C{--rcpts} pipelined RCPTs, RSET, QUIT, over one connection;
    again every C{--rcpt-every} seconds.
    """
    result = phase.rcpt
    args = phase.args
    while not phase.stop_abuse.is_set():
        try:
            async with asyncio.timeout(120):
                reader, writer = await asyncio.open_connection(HOST, phase.port)
                try:
                    code, lines = await read_reply(reader)
                    if code != 220:
                        raise SMTPReplyError(f"greeting {reply_text(code, lines)}")
                    writer.write(b"EHLO flood.bench\r\n")
                    await read_reply(reader)
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
            if len(result.error_samples) < 5:
                result.error_samples.append(f"t={phase.now():.1f}s {type(e).__name__}: {e}"[:200])
        try:
            await asyncio.wait_for(phase.stop_abuse.wait(), args.rcpt_every)
        except TimeoutError:
            pass


async def huge_header(phase: Phase, worker: int) -> None:
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
                reader, writer = await asyncio.open_connection(HOST, phase.port)
                try:
                    code, lines = await read_reply(reader)
                    if code != 220:
                        raise SMTPReplyError(f"greeting {reply_text(code, lines)}")
                    writer.write(b"EHLO huge.bench\r\n")
                    await read_reply(reader)
                    writer.write(f"MAIL FROM:<huge{worker}@bench.test>\r\nRCPT TO:<{SINK_USER}>\r\nDATA\r\n".encode())
                    for wanted in (250, 250, 354):
                        code, lines = await read_reply(reader)
                        if code != wanted:
                            raise SMTPReplyError(f"MAIL/RCPT/DATA {reply_text(code, lines)}")
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
            if len(result.error_samples) < 5:
                result.error_samples.append(f"t={phase.now():.1f}s {type(e).__name__}: {e}"[:200])
        try:
            await asyncio.wait_for(phase.stop_abuse.wait(), args.huge_every)
        except TimeoutError:
            pass


# Sampling.


async def sampler(phase: Phase, stop: asyncio.Event, every: float = 1.0, sockets_every: int = 5) -> None:
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
            "machine_cores": (busy - last_busy) / _CLK_TCK / span,
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


async def fsync_probe(phase: Phase, folder: Path, stop: asyncio.Event, every: float = 1.0) -> None:
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


def dirty_near(phase: Phase, start: float, end: float) -> float:
    """
    The most dirty page cache (MiB) sampled within a second of [start, end].
    """
    values = [x["dirty_kib"] for x in phase.samples if start - 1 <= x["t"] <= end + 1]
    return max(values, default=0) / 1024


def probes_near(phase: Phase, start: float, end: float) -> float:
    """
    The slowest fsync probe running at some point within [start, end].
    """
    worst = 0.0
    for t, ms, _ in phase.fsync_probes:
        if t <= end and t + ms / 1000 >= start:
            worst = max(worst, ms)
    return worst


async def progress(phase: Phase, stop: asyncio.Event, every: float) -> None:
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


# One phase.


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
    marks["machine_busy_s"] = (system_busy_ticks() - busy0) / _CLK_TCK
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


def poll_noread(phase: Phase) -> float:
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


def noread_state(phase: Phase) -> dict:
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


# Checks after a phase.


def maildir_names(peer: MailServerPeer, user: str) -> list[str]:
    names = []
    for sub in ("new", "cur"):
        try:
            names += os.listdir(peer.maildir(user) / sub)
        except FileNotFoundError:
            pass
    return names


def check_maildir(peer: MailServerPeer, good: GoodResult) -> dict:
    names = maildir_names(peer, GOOD_USER)
    stems = {n.split(",", 1)[0].split(":", 1)[0] for n in names}
    missing = [q for q in good.queue_ids if q.split(",", 1)[0] not in stems]
    return {
        "accepted": len(good.records),
        "with_queue_id": len(good.queue_ids),
        "files": len(names),
        "missing": len(missing),
        "missing_samples": missing[:5],
    }


LOG_LEVEL = re.compile(r"#(warn|error|critical)\]")


def scan_log(peer: MailServerPeer) -> dict:
    text = ""
    for path in (peer.log_path, peer.root / "server.log"):
        if path.exists():
            text += path.read_text(errors="replace")
    levels = Counter()
    samples: Counter = Counter()
    for line in text.splitlines():
        m = LOG_LEVEL.search(line)
        if m:
            levels[m.group(1)] += 1
            message = line.split("] ", 1)[-1]
            samples[re.sub(r"\d+", "N", message)[:160]] += 1
    return {
        "levels": dict(levels),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "unhandled": text.count("Unhandled"),
        "top_messages": samples.most_common(8),
        "lines": text.count("\n"),
    }


# The report.


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


def shedding_verdict(phase: Phase, m: dict) -> list[str]:
    """
    Did the server close each slow client when its deadline passed, and
    only then?  (A slow-loris line's deadline starts at its last complete
    command, EHLO; a DATA slow-loris's at the 354; a never-reader's when the
    server last took a command from it, about when its flood settled.)
    """
    out = []
    elapsed = m["ramp_s"] + m["burst_s"] + m["measure_s"]
    for kind, timeout in (("cmd", m["command_timeout"]), ("data", m["data_timeout"])):
        s = phase.slow[kind]
        if not s.ready:
            continue
        due = sum(1 for started in s.ports.values() if m["measure_end"] - started > timeout + 2)
        early = sum(1 for a in s.close_after_s if a < timeout - 1)
        late = sum(1 for a in s.close_after_s if a > timeout + 2)
        timeouts = sum(n for r, n in s.close_replies.items() if r.startswith("421 4.4.2"))
        if due == 0:
            ok = s.closed_by_server == 0
            text = (f"none was due (connected at most {elapsed:.0f}s < {timeout}s) and "
                    f"{'none' if ok else s.closed_by_server} was closed")
        else:
            ok = early == 0 and late == 0 and timeouts == s.closed_by_server and s.closed_by_server >= due
            text = (f"{due} were due to be closed, {s.closed_by_server} closed ({timeouts} with 421 4.4.2), "
                    f"{early} early, {late} more than 2 s late")
        out.append(f"  deadline check, {KIND_NAMES[kind]} (timeout {timeout}s): {text} -> {'OK' if ok else 'NOT OK'}")
    nr = phase.slow["noread"]
    if nr.ready:
        timeout = m["command_timeout"]
        settled = m["measure_start"]
        waited = m["measure_end"] - settled
        closed = len(nr.server_closed)
        if waited > timeout + 5:
            ok = closed == nr.ready
            out.append(
                f"  deadline check, {KIND_NAMES['noread']} (timeout {timeout}s): the server stopped reading from them "
                f"by the time the flood settled, {waited:.0f}s before the end, so all {nr.ready} were due to be closed; "
                f"it closed {closed} -> {'OK' if ok else 'NOT OK (server bug, see the README)'}"
            )
        else:
            out.append(
                f"  deadline check, {KIND_NAMES['noread']} (timeout {timeout}s): not due within the window "
                f"({waited:.0f}s); closed {closed}"
            )
    return out


def describe(result: dict, peer_note: str) -> list[str]:
    phase: Phase = result["phase"]
    m = result["marks"]
    args = phase.args
    out = [f"== phase {phase.name}: {peer_note}"]
    c = result["counts"]
    out.append(
        f"slow clients: {c['cmd'] + c['data']} slow-loris (in position after {m['ramp_s']:.1f}s) + {c['noread']} "
        f"never-readers (their flood settled after {m['burst_s']:.1f}s); open when measuring began "
        f"{m['open_at_start']}, at its end {m['open_at_end']} (measured {m['measure_s']:.1f}s)"
    )
    for kind in KINDS:
        s = phase.slow[kind]
        if not s.wanted:
            continue
        line = (
            f"  {KIND_NAMES[kind]}: {s.wanted} wanted, {s.connected} connected, {s.ready} in position, "
            f"open at the end {m['open_at_end_by_kind'][kind]}, closed by the server "
            f"{len(s.server_closed) if kind == 'noread' else s.closed_by_server}"
        )
        if s.close_replies:
            line += " (" + ", ".join(f"{n}x {r!r}" for r, n in s.close_replies.most_common(3)) + ")"
        if s.close_after_s:
            cs = sorted(s.close_after_s)
            line += (f", closed {cs[0]:.1f}/{percentile(cs, 50):.1f}/{cs[-1]:.1f}s "
                     f"(min/median/max) after their deadline started")
        if s.refused:
            line += f", refused {dict(s.refused)}"
        if s.failed:
            line += f", failed {s.failed} (e.g. {s.error_samples[0]})"
        if s.other_replies:
            line += f", other replies {dict(s.other_replies)}"
        if kind != "noread":
            line += f"; {s.bytes_sent} octets trickled; server side at the end: {m[kind + '_server_sockets']}"
        out.append(line)
        if kind == "noread" and s.wanted:
            b = m["noread_after_burst"]
            out.append(
                f"    after the flood: the server had stopped reading from {b['server_stopped_reading']}/{b['clients']} "
                f"(octets unread in its kernel), having taken {b['noops_taken_min']}-{b['noops_taken_max']} NOOPs "
                f"from each; up to {b['replies_queued_kib_max']:.0f} KiB of replies queued in the kernels per "
                f"connection; closed by the server so far {b['closed_by_server']}"
            )
            out.append(
                f"    NOOPs written {s.noops_given} ({s.noops_given // max(1, s.ready)} per client), of which "
                f"{s.noops_unsent} never left our own buffer (writes of {s.blocked} clients stuck there for 5 s); "
                f"server side at the end: {m['noread_server_sockets']}, unread by the server "
                f"{m['noread_server_rx_kib_min']:.0f}-{m['noread_server_rx_kib_max']:.0f} KiB, unsent in its kernel "
                f"<= {m['noread_server_tx_kib_max']:.0f} KiB per connection"
            )
            closed = sorted(s.server_closed.values())
            out.append(
                f"    server closed its side (socket gone or out of ESTABLISHED, polled from /proc/net/tcp) of "
                f"{len(closed)}/{s.ready} while they did not read"
                + (f", {closed[0]:.1f}/{percentile(closed, 50):.1f}/{closed[-1]:.1f}s (min/median/max) "
                   f"after connecting" if closed else "")
            )
            out.append(
                f"    when they finally read ({args.final_read:.0f}s; before that they had read at most "
                f"{m['noread_final']['read_before_kib_max']:.1f} KiB, the greeting): {m['noread_final']['replies']}, "
                f"connection closed by the server: {m['noread_final']['closed_by_server_after_reading']}"
                f"/{m['noread_final']['clients']}"
            )
    out += shedding_verdict(phase, m)
    # Well-behaved.
    g = phase.good
    by_stage = {}
    for stage in ("baseline", "ramp", "noread flood", "measure"):
        by_stage[stage] = stats_ms([r["ms"] for r in g.records if r["stage"] == stage])
    out.append(
        f"well-behaved SMTP client (1 message / {args.interval * 1000:.0f} ms, new connection each, {args.size} octets):"
        f" {len(g.records)} accepted, {g.errors} errors, {g.quit_errors} bad QUIT replies"
    )
    for stage, s in by_stage.items():
        label = {"baseline": "alone (baseline)", "ramp": "while the slow-loris clients connect",
                 "noread flood": "during the never-readers' NOOP flood",
                 "measure": f"measure window, {m['open_at_start']} slow clients open"}[stage]
        if not s["n"] and stage == "noread flood":
            continue
        out.append(f"  {label}: {fmt_ms(s)}")
    for e in g.error_samples[:5]:
        out.append(f"  error: {e}")
    slow_ones = sorted((r for r in g.records if r["ms"] > TARGET_MS), key=lambda r: -r["ms"])
    for r in slow_ones[:8]:
        out.append(
            f"  over {TARGET_MS:.0f} ms: t={r['t']:.1f}s {r['stage']} {r['ms']:.1f} ms, steps {r['steps']}, "
            f"abuse going on meanwhile {phase.abuse_during(r['t0'], r['t0'] + r['ms'] / 1000) or 'none'}, "
            f"slowest fsync probe meanwhile {probes_near(phase, r['t'], r['t'] + r['ms'] / 1000):.1f} ms, "
            f"dirty page cache up to {dirty_near(phase, r['t'], r['t'] + r['ms'] / 1000):.1f} MiB"
        )
    if len(slow_ones) > 8:
        out.append(f"  ... and {len(slow_ones) - 8} more over {TARGET_MS:.0f} ms")
    probes = sorted(ms for _, ms, stage in phase.fsync_probes if stage == "measure")
    dirty = sorted(x["dirty_kib"] / 1024 for x in phase.samples if x["stage"] == "measure")
    if probes:
        out.append(
            f"  disk (1 KiB write + fsync in a thread, once a second, measure window): p50 {percentile(probes, 50):.1f} "
            f"ms, max {probes[-1]:.1f} ms, {sum(1 for p in probes if p > 20)} of {len(probes)} over 20 ms; "
            f"machine's dirty page cache p50 {percentile(dirty, 50):.1f} MiB, max {dirty[-1] if dirty else 0:.1f} MiB "
            f"(the server's group commit syncfs()es the whole file system before each 250)"
        )
    meas = by_stage["measure"]
    if meas["n"] == 0:
        verdict = "NO DATA"
    elif meas["max"] <= TARGET_MS:
        verdict = f"met: every one of {meas['n']} messages within {TARGET_MS:.0f} ms (max {meas['max']:.1f} ms)"
    elif meas["p99"] <= TARGET_MS:
        verdict = (f"met at p99 ({meas['p99']:.1f} ms), but {meas['over_target']} of {meas['n']} messages "
                   f"took longer (max {meas['max']:.1f} ms)")
    else:
        verdict = f"NOT met: p99 {meas['p99']:.1f} ms, {meas['over_target']} of {meas['n']} over"
    out.append(f"  verdict vs '{TARGET_MS:.0f} ms with {m['open_at_start']} slow clients connected': {verdict}")
    after = stats_ms([r["ms"] for r in g.records if r["stage"] != "baseline"])
    worst_stage = max(by_stage, key=lambda k: by_stage[k]["max"] if by_stage[k]["n"] else -1)
    out.append(
        f"  throughout the abuse (every stage after the baseline): {after['n']} msgs, {g.errors} errors, max "
        f"{after['max']:.1f} ms, {after['over_target']} over {TARGET_MS:.0f} ms (worst stage: {worst_stage})"
    )
    p = phase.pop3
    if p.sessions:
        ps = stats_ms(p.latencies_ms)
        out.append(
            f"POP3 client (USER/PASS/STAT every {args.pop3_every:.0f}s): {p.ok}/{p.sessions} ok, errors {p.errors}, "
            f"login+STAT p50 {ps['p50']:.1f} ms max {ps['max']:.1f} ms; last {p.last_stat!r}"
        )
        for e in p.error_samples[:3]:
            out.append(f"  error: {e}")
    # Memory and CPU.
    rss = [s["rss_kib"] for s in phase.samples]
    meas_rss = [s["rss_kib"] for s in phase.samples if s["stage"] == "measure"]
    out.append(
        f"server RSS (MiB): before abuse {m['rss_before_abuse_kib'] / 1024:.1f}, slow-loris connected "
        f"{m['rss_loris_connected_kib'] / 1024:.1f}, all connected "
        f"{m['rss_all_connected_kib'] / 1024:.1f}, peak {max(rss, default=0) / 1024:.1f} "
        f"(measure window {min(meas_rss, default=0) / 1024:.1f}-{max(meas_rss, default=0) / 1024:.1f}), "
        f"end {m['rss_end_kib'] / 1024:.1f}, after the clients closed {m['rss_after_close_kib'] / 1024:.1f}; "
        f"VmHWM {m['hwm_end_kib'] / 1024:.1f}"
    )
    loris = c["cmd"] + c["data"]
    if loris:
        out.append(
            f"  per slow-loris connection: {(m['rss_loris_connected_kib'] - m['rss_before_abuse_kib']) / loris:.2f} KiB"
            + (f"; growth during the never-readers' flood: "
               f"{(m['rss_all_connected_kib'] - m['rss_loris_connected_kib']) / 1024:.1f} MiB" if c["noread"] else "")
            + f"; server threads: {m['threads_before_abuse']} before abuse, {m['threads_all_connected']} all "
            f"connected, {m['threads_end']} at the end (each thread-pool thread that has run an scrypt password "
            f"check keeps its ~16 MiB buffer resident)"
        )
    if meas_rss:
        third = max(1, len(meas_rss) // 3)
        out.append(
            f"  RSS trend in the measure window: first third avg {sum(meas_rss[:third]) / third / 1024:.1f}, "
            f"last third avg {sum(meas_rss[-third:]) / third / 1024:.1f} MiB"
        )
    ms = m["measure_s"] or 1
    out.append(
        f"CPU in the measure window: server {m['server_cpu_s']:.1f}s = {m['server_cpu_s'] / ms:.2f} cores, "
        f"load generator {m['loadgen_cpu_s']:.1f}s = {m['loadgen_cpu_s'] / ms:.2f} cores, whole machine "
        f"{m['machine_busy_s'] / ms:.2f} of {os.cpu_count()} cores (so others: "
        f"{max(0.0, (m['machine_busy_s'] - m['server_cpu_s'] - m['loadgen_cpu_s']) / ms):.2f}); "
        f"loadavg {m['loadavg_start']} -> {m['loadavg_end']}"
    )
    out.append(
        f"server fds: before abuse {m['fds_before_abuse']}, end {m['fds_end']}, after the clients closed "
        f"{m['fds_after_close']} ({m['close_s']:.1f}s after they closed)"
    )
    # Abusers.
    if phase.brute.attempts or phase.brute.errors:
        out += describe_brute(phase.brute, args)
    r = phase.rcpt
    if r.rounds or r.errors:
        out.append(
            f"RCPT flood (MAIL + {args.rcpts} RCPTs pipelined, every {args.rcpt_every:.0f}s, {args.rcpt_clients} "
            f"client(s)): {r.rounds} rounds, RCPT answers {dict(r.codes)}, accepted per round "
            f"{sorted(set(r.accepted_per_round))}, round time p50 {percentile(sorted(r.per_round_ms), 50):.1f} ms "
            f"max {max(r.per_round_ms, default=float('nan')):.1f} ms, errors {r.errors}"
        )
        for e in r.error_samples[:3]:
            out.append(f"  error: {e}")
    h = phase.huge
    if h.sent_octets or h.errors:
        out.append(
            f"huge header ({args.huge_mb:g} MiB of header lines, no blank line, {args.huge_clients} client(s), every "
            f"{args.huge_every:.0f}s): {len(h.sent_octets)} sent, answers {dict(h.replies)}, transfer p50 "
            f"{percentile(sorted(h.transfer_s), 50):.2f}s, answer after the dot p50 "
            f"{percentile(sorted(h.answer_ms), 50):.0f} ms max {max(h.answer_ms, default=float('nan')):.0f} ms, "
            f"errors {h.errors}"
        )
        for e in h.error_samples[:3]:
            out.append(f"  error: {e}")
    md = result["maildir"]
    out.append(
        f"Maildir of {GOOD_USER}: {md['files']} files; {md['accepted']} messages accepted, "
        f"{md['accepted'] - md['missing']} of them found by queue id, missing {md['missing']}"
        + (f" (e.g. {md['missing_samples']})" if md["missing"] else "")
        + (" -> all there" if md["missing"] == 0 and md["files"] == md["accepted"] else " -> MISMATCH")
    )
    log = result["log"]
    out.append(
        f"server log: {log['lines']} lines, warn/error/critical {log['levels'] or 0}, tracebacks "
        f"{log['tracebacks']}, 'Unhandled' {log['unhandled']}"
    )
    for message, n in log["top_messages"]:
        out.append(f"  {n}x {message}")
    return out


# Main.


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("cmd", "data"):
            raise argparse.ArgumentTypeError(f"unknown kind {key!r} (kinds: cmd, data)")
        mix[key] = float(value)
    return mix


def parse_interval(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    lo_f = float(lo)
    hi_f = float(hi or lo)
    if not 0.05 <= lo_f <= hi_f:
        raise argparse.ArgumentTypeError("give MIN,MAX seconds, 0.05 <= MIN <= MAX")
    return lo_f, hi_f


def parse_args(argv):
    p = argparse.ArgumentParser(description="abuse load test of our server (see bench/README.md)")
    p.add_argument("--quick", action="store_true",
                   help="500 slow-loris + 5 never-readers for 45 s, shedding phase with 150 + 5 (about 2 minutes)")
    p.add_argument("--slow", type=int, default=None, help="slow-loris clients in the hold phase (2000; quick 500)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("cmd=50,data=50"),
                   help="weights of the slow-loris kinds: cmd (command line), data (in DATA) (cmd=50,data=50)")
    p.add_argument("--noread", type=int, default=None,
                   help="clients that pipeline NOOPs and never read, on top of --slow (20; quick 5)")
    p.add_argument("--shed-noread", type=int, default=5, help="never-readers in the shedding phase (5)")
    p.add_argument("--burst-max", type=float, default=180.0,
                   help="longest wait for the never-readers' flood to settle before measuring (s)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds measured once every slow client is in position and the NOOP flood has settled "
                        "(120; quick 45)")
    p.add_argument("--baseline", type=float, default=5.0, help="seconds of the well-behaved client alone first")
    p.add_argument("--byte-interval", type=parse_interval, default=(2.0, 5.0),
                   help="slow-loris: seconds between octets, MIN,MAX (2,5)")
    p.add_argument("--noops", type=int, default=400_000,
                   help="NOOPs each never-reader writes (400000, 2.4 MB, whose 5.6 MB of replies are more than "
                        "the kernels' buffers take, so the server must stop reading from it)")
    p.add_argument("--ramp-parallel", type=int, default=50, help="slow connections being opened at once (50)")
    p.add_argument("--interval", type=float, default=0.1, help="well-behaved client: seconds between messages")
    p.add_argument("--size", type=int, default=1024, help="well-behaved message size, octets")
    p.add_argument("--pop3-every", type=float, default=5.0, help="POP3 login+STAT every N s (0: none)")
    p.add_argument("--bf-workers", type=int, default=None,
                   help="brute-force connections at once (4; quick 8; 0: no guesser)")
    p.add_argument("--bf-per-connection", type=int, default=1, help="AUTH tries per connection (1)")
    p.add_argument("--bf-source", default="127.0.0.2",
                   help="address the guesser connects from (127.0.0.2: the throttle blames an address, so "
                        "guessing from 127.0.0.1 would lock out the well-behaved POP3 user too)")
    p.add_argument("--bf-pause", type=float, default=0.1, help="guesser's pause after a 454 (s)")
    p.add_argument("--rcpt-clients", type=int, default=1, help="RCPT flooders (1; 0: none)")
    p.add_argument("--rcpts", type=int, default=1000, help="RCPTs per flood (1000)")
    p.add_argument("--rcpt-every", type=float, default=5.0, help="seconds between a flooder's rounds (5)")
    p.add_argument("--huge-clients", type=int, default=1, help="huge-header senders (1; 0: none)")
    p.add_argument("--huge-mb", type=float, default=8.0, help="MiB of header lines per huge message (8)")
    p.add_argument("--huge-every", type=float, default=15.0, help="seconds between a sender's messages (15)")
    p.add_argument("--command-timeout", type=int, default=None,
                   help="hold phase: limits.smtp_command_timeout (server default 300)")
    p.add_argument("--data-timeout", type=int, default=None,
                   help="hold phase: limits.smtp_data_timeout (server default 600)")
    p.add_argument("--no-shed", action="store_true", help="skip the shedding phase")
    p.add_argument("--shed-only", action="store_true", help="run only the shedding phase")
    p.add_argument("--shed-slow", type=int, default=None, help="slow-loris clients in the shedding phase (300; quick 150)")
    p.add_argument("--shed-command-timeout", type=int, default=10, help="shedding phase: smtp_command_timeout (10)")
    p.add_argument("--shed-data-timeout", type=int, default=15, help="shedding phase: smtp_data_timeout (15)")
    p.add_argument("--final-read", type=float, default=5.0,
                   help="seconds the never-readers finally read at the end of a phase")
    p.add_argument("--progress-every", type=float, default=10.0)
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--keep", action="store_true",
                   help="keep the servers' temporary folders (in /tmp/bench-abuse-*: logs, Maildirs)")
    args = p.parse_args(argv)
    quick = args.quick
    for key, q, full in (("slow", 500, 2000), ("duration", 45.0, 120.0), ("bf_workers", 8, 4),
                         ("shed_slow", 150, 300), ("noread", 5, 20)):
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    args.slow = max(0, min(args.slow, MAX_SLOW))
    args.shed_slow = max(0, min(args.shed_slow, MAX_SLOW))
    args.noread = max(0, min(args.noread, 1000))
    args.shed_noread = max(0, min(args.shed_noread, 1000))
    args.duration = max(1.0, min(args.duration, MAX_DURATION))
    args.ramp_parallel = max(1, min(args.ramp_parallel, 500))
    args.interval = max(0.01, args.interval)
    return args


def server_for(args, slow: int, command_timeout: int | None, data_timeout: int | None) -> tuple[MailServerPeer, str]:
    max_connections = max(5000, slow + 1000)
    peer = MailServerPeer(users=USERS, password=PASSWORD, max_connections=max_connections, keep=args.keep)
    extra = []
    if command_timeout is not None:
        extra.append(f"smtp_command_timeout = {command_timeout}")
    if data_timeout is not None:
        extra.append(f"smtp_data_timeout = {data_timeout}")
    if extra:
        # [limits] is the last table of the file the peer wrote.
        with open(peer.config_path, "a") as f:
            f.write("\n".join(extra) + "\n")
    note = (
        f"limits.max_connections = max_connections_per_client = {max_connections} (raised so every connection "
        f"from 127.0.0.1 is admitted); smtp_command_timeout = "
        f"{command_timeout if command_timeout is not None else '300 (default)'}, smtp_data_timeout = "
        f"{data_timeout if data_timeout is not None else '600 (default)'}, everything else default "
        f"(max_recipients 100, min_data_rate 500, auth_failure_delay 1.0, max_auth_failures_per_client 20)"
    )
    return peer, note


def run_one(args, name: str, slow: int, noread: int, hold: float, command_timeout, data_timeout,
            abusers: bool) -> list[str]:
    peer, note = server_for(args, slow + noread, command_timeout, data_timeout)
    with peer:
        print(f"[{name}] server pid {peer.pid}, SMTP {peer.port}, POP3 {peer.pop3_port}, folder {peer.root}"
              f"{' (kept)' if args.keep else ''}", flush=True)
        print(f"[{name}] {note}", flush=True)
        loop = new_event_loop()
        try:
            result = loop.run_until_complete(run_phase(name, args, peer, slow, noread, hold, abusers,
                                                      (command_timeout or 300, data_timeout or 600)))
        finally:
            loop.close()
        peer.stop()
        result["maildir"] = check_maildir(peer, result["phase"].good)
        result["log"] = scan_log(peer)
        lines = describe(result, note)
        if args.json:
            RESULTS[name] = to_json(result)
    return lines


RESULTS: dict = {}


def to_json(result: dict) -> dict:
    phase: Phase = result["phase"]
    return {
        "marks": result["marks"],
        "counts": result["counts"],
        "slow": {k: {kk: (dict(vv) if isinstance(vv, Counter) else vv) for kk, vv in vars(s).items()
                     if kk not in ("ports", "close_after_s")} | {"close_after_s": sorted(s.close_after_s)}
                 for k, s in phase.slow.items()},
        "good_ms": [(r["t"], r["stage"], r["ms"]) for r in phase.good.records],
        "good_errors": phase.good.error_samples,
        "pop3": vars(phase.pop3),
        "brute": {"attempts": phase.brute.attempts, "connections": phase.brute.connections},
        "rcpt": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(phase.rcpt).items()},
        "huge": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(phase.huge).items()},
        "samples": phase.samples,
        "maildir": result["maildir"],
        "log": result["log"],
    }


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--good-child"]:
        loop = new_event_loop()
        try:
            loop.run_until_complete(good_child_main(json.loads(argv[1])))
        finally:
            loop.close()
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    soft, hard = raise_nofile()
    print(
        f"abuse load test: {os.cpu_count()} cores, load generator on {loop_kind()}, RLIMIT_NOFILE {soft}/{hard}, "
        f"loadavg {loadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        flush=True,
    )
    needed = args.slow + args.noread + 200
    if soft < needed:
        print(f"warning: open-file limit {soft} < {needed} needed", flush=True)
    # The servers' folders go into a folder of our own, so that nobody
    # clearing away /tmp/bench-mailserver-* (other benchmarks keep theirs
    # there) pulls the data folder from under a running server.
    parent = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    tempfile.tempdir = str(parent)
    reports: list[str] = []
    t0 = time.monotonic()
    try:
        if not args.shed_only:
            reports += run_one(args, "hold", args.slow, args.noread, args.duration, args.command_timeout,
                               args.data_timeout, True)
        if not args.no_shed:
            hold = max(args.shed_command_timeout, args.shed_data_timeout) + 10
            reports += run_one(args, "shed", args.shed_slow, args.shed_noread, hold, args.shed_command_timeout,
                               args.shed_data_timeout, False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        tempfile.tempdir = None
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    print()
    print(f"=== abuse load test results ({time.monotonic() - t0:.0f}s; {os.cpu_count()} cores, "
          f"loadavg now {loadavg()})")
    for line in reports:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
