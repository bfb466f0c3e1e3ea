"""
Memory check: a soak at steady load, watching the server's RSS and open
files for growth.

From the speed issue: "a 30-minute soak at steady load shows no growth".
Hand-run, never part of the test suite::

    .venv/bin/python bench/soak.py --minutes 30            # the real thing
    .venv/bin/python bench/soak.py --minutes 3 --keep      # a trial; keep the log
    nohup .venv/bin/python bench/soak.py --minutes 30 --keep --json /tmp/soak.json > /tmp/soak.out 2>&1 &

Our server (L{bench.peers.MailServerPeer}, default configuration but for
the benchmark's raised connection limits; users bob, alice, carol and dave
@localhost) gets, for C{--minutes}:

 - SMTP: C{--rate} messages a second (default 100; open loop: a message is
   started every 1/rate s whatever the replies, at most C{--max-inflight}
   at once), each on a new connection (EHLO, MAIL/RCPT.../DATA pipelined,
   body, QUIT), 1-10 KiB, to one random user; 8% to two users, 2% to all
   four (one file, hard-linked).
 - POP3: one client that every C{--pop3-interval} s logs in to each
   mailbox in turn, RETRs and DELEs everything there and QUITs, so the
   Maildirs stay small.  Every C{--pop3-abort-every}th session is cut (a
   TCP reset) after its first RETR and DELE instead of QUIT: nothing may be
   deleted then, and the mailbox must be unlocked for the next session.
 - Abuse, one event every 10 s in turn: an unknown SMTP command, an
   unknown POP3 command, a message cut mid-DATA by a FIN, one cut by a RST
   (neither may ever be delivered); and every C{--auth-fail-every} s (60) a
   failed login with a wrong password, SMTP AUTH PLAIN and POP3 USER/PASS
   in turn.  The server remembers failures per address for 900 s and
   refuses an address after 20 (C{limits.auth_failure_window},
   C{max_auth_failures_per_client}); one a minute stays under that, so the
   POP3 client (same address) is never refused.

At the start, before the load, C{--warm-logins} (10) POP3 logins run at
once, twice.  Each password check is scrypt (n=2**14, r=8: a 16 MiB
buffer) in a server thread (its password pool of min(cores, 4) threads
since d8f90ff, the reactor's pool of up to 10 before), and glibc keeps the
freed buffer resident in the malloc arena of the thread that ran it, so
RSS steps up by 16 MiB whenever a check first runs in an arena without
one (after the first such buffer is freed: glibc serves it by mmap, unmaps
it, and raises its mmap threshold above 16 MiB).  Ten at once, twice, fill
the pool and most arenas before the series starts; the steps left are
shown apart: each sample also has the RSS in glibc's per-thread arenas
(64 MiB-aligned anonymous mappings in C{/proc/<pid>/smaps}), and the
summary gives RSS outside them.  (A bounded cost, not growth with time,
but memory all the same: see bench/README.md; C{--server-env
MALLOC_MMAP_THRESHOLD_=1048576} makes it go away.)

Every C{--sample} s (10) the server's VmRSS, open fds (C{/proc/<pid>/fd}),
threads and CPU are read (summed over its session), with the Maildir file
count and C{/proc/loadavg}; a line is printed each minute.  At the end the
load stops, the POP3 client empties every mailbox, and the summary says:
RSS at 1 min (after warm-up), at the end and its max, and the rise from
the one to the other (medians over a minute); the slope of RSS over the
last 2/3 of the run, KiB/min (Theil-Sen, the median of the slopes between
every two samples: a sample that lands inside a password check has that
check's 16 MiB scrypt buffer in it, and a few of those late in the window
tilted a least-squares line by up to +50 KiB/min; the least-squares slope
is printed too); the least-squares slope of fds;
messages sent, accepted, fetched; every accepted (message, recipient)
fetched exactly once (duplicates only after a cut session), nothing cut
mid-DATA delivered; errors; and the server log's warnings and tracebacks.

Verdict "no growth": RSS slope < C{--max-slope-kib} (50 KiB/min) and
end - warm RSS < C{--max-rise-mib} (5 MiB), fds end - warm < 20 and fd
slope < 1/min, and no errors.  At 100 msgs/s, 50 KiB/min is 8.5 octets per
message: a leak of a single small object (a 56-octet float, a dict entry)
per message or per connection is several times that, while a steady
server's RSS wanders by a few hundred KiB as the allocator's pools fill and
empty.  5 MiB bounds a slow step-wise rise the slope might miss.  When
only RSS outside the arenas passes and the arenas rose by whole 16 MiB
steps, the verdict says so ("no growth outside the malloc thread arenas").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import MailServerPeer, cpu_seconds, rss_kib, session_pids
from bench.smtp_client import SMTPReplyError, check, close, command, connect, expect, greet, reply_text
from bench.smtp_load import new_event_loop

PASSWORD = "bench-password"
USERS = ("bob@localhost", "alice@localhost", "carol@localhost", "dave@localhost")
# Only for the warm-up logins at once (a mailbox is locked per session).
WARM_USERS = tuple(f"warm{i}@localhost" for i in range(12))
SENDER = "soak@bench.test"
TIMEOUT = 60.0
LINE = b"x" * 74 + b"\r\n"
MSGID = re.compile(rb"\r\nMessage-ID: <([^>]+)>", re.IGNORECASE)
AUTH_WINDOW = 900  # limits.auth_failure_window (default)
AUTH_LIMIT = 20  # limits.max_auth_failures_per_client (default)


# Shared state


@dataclass
class Stats:
    attempted: int = 0
    accepted: int = 0  # messages answered 250
    accepted_rcpts: int = 0  # (message, recipient) pairs
    skipped: int = 0  # not started: --max-inflight messages already in flight
    inflight: int = 0
    pop3_sessions: int = 0
    pop3_cut: int = 0
    fetched: int = 0  # RETRs answered, duplicates included
    fetched_unique: int = 0
    duplicates: int = 0
    deleted: int = 0
    events: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    # Message-ID -> recipients whose 250 we saw and who haven't fetched it yet.
    expected: dict[str, set[str]] = field(default_factory=dict)
    fetched_ids: set[tuple[str, str]] = field(default_factory=set)
    unexpected: int = 0  # fetched, never accepted (or cut mid-DATA!)
    # Messages RETRed and DELEd in a session then cut: must come back.
    cut_pending: set[tuple[str, str]] = field(default_factory=set)

    def error(self, kind: str, what: object) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {what}"[:300])


class ProtocolError(Exception):
    pass


def body_for(msgid: str, rcpts: list[str], size: int) -> bytes:
    header = (
        f"From: <{SENDER}>\r\nTo: {', '.join('<' + r + '>' for r in rcpts)}\r\n"
        f"Subject: soak\r\nMessage-ID: <{msgid}>\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    ).encode("ascii")
    lines = max(1, (size - len(header)) // len(LINE))
    return header + LINE * lines


# SMTP


async def smtp_message(port: int, stats: Stats, seq: int, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.02:
        rcpts = list(USERS)
    elif roll < 0.10:
        rcpts = rng.sample(USERS, 2)
    else:
        rcpts = [rng.choice(USERS)]
    msgid = f"soak.{seq}.{os.getpid()}@bench.test"
    body = body_for(msgid, rcpts, rng.randint(1024, 10240))
    stats.attempted += 1
    stats.inflight += 1
    writer = None
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await connect("127.0.0.1", port, ehlo="soak.client")
            writer.write(
                f"MAIL FROM:<{SENDER}> SIZE={len(body)}\r\n".encode()
                + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
                + b"DATA\r\n"
            )
            await expect(reader, 250, "MAIL")
            for _ in rcpts:
                await expect(reader, 250, "RCPT")
            await expect(reader, 354, "DATA")
            # Recorded before the 250 arrives: the fetcher may see it first.
            stats.expected[msgid] = set(rcpts)
            writer.write(body + b".\r\n")
            try:
                await expect(reader, 250, "end of DATA")
            except BaseException:
                stats.expected.pop(msgid, None)
                raise
            stats.accepted += 1
            stats.accepted_rcpts += len(rcpts)
            check(*(await command(reader, writer, "QUIT")), 221, "QUIT")
    except (OSError, TimeoutError, ProtocolError, SMTPReplyError) as e:
        stats.error("smtp", f"{type(e).__name__}: {e}")
    finally:
        stats.inflight -= 1
        if writer is not None:
            await close(writer)


async def smtp_driver(port: int, stats: Stats, rate: float, max_inflight: int, stop: asyncio.Event) -> None:
    rng = random.Random(1)
    tasks: set[asyncio.Task] = set()
    t0 = time.monotonic()
    started = 0
    while not stop.is_set():
        due = int((time.monotonic() - t0) * rate)
        while started < due:
            started += 1
            if stats.inflight >= max_inflight:
                stats.skipped += 1
                continue
            task = asyncio.ensure_future(smtp_message(port, stats, started, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        try:
            await asyncio.wait_for(stop.wait(), 0.01)
        except TimeoutError:
            pass
    if tasks:
        await asyncio.wait(tasks, timeout=TIMEOUT + 5)


# POP3


class Pop3:
    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Pop3:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        session = cls(reader, writer)
        await session.status("greeting")
        return session

    async def status(self, what: str) -> bytes:
        line = await self.reader.readline()
        if not line.startswith(b"+OK"):
            raise ProtocolError(f"POP3 {what}: {line[:120]!r}")
        return line

    async def command(self, text: str) -> bytes:
        self.writer.write(text.encode() + b"\r\n")
        return await self.status(text.split()[0])

    async def multiline(self, what: str) -> bytes:
        await self.status(what)
        data = await self.reader.readuntil(b"\r\n.\r\n")  # no body line is a lone "."
        return data[:-5]


def note_fetched(stats: Stats, user: str, message: bytes) -> tuple[str, str]:
    stats.fetched += 1
    m = MSGID.search(message[:4096])
    msgid = m.group(1).decode("ascii", "replace") if m else "?"
    key = (msgid, user)
    if key in stats.fetched_ids:
        stats.duplicates += 1
        stats.cut_pending.discard(key)
        return key
    waiting = stats.expected.get(msgid)
    if waiting is None or user not in waiting:
        stats.unexpected += 1
        stats.error("unexpected message", f"{user} got {msgid!r}")
        return
    waiting.discard(user)
    if not waiting:
        del stats.expected[msgid]
    stats.fetched_ids.add(key)
    stats.fetched_unique += 1
    return key


async def pop3_session(port: int, user: str, stats: Stats, cut: bool = False) -> int:
    """
    Fetch and delete everything in C{user}'s mailbox; return how many
    messages there were.  With C{cut}, reset the connection after the
    first RETR and DELE instead.
    """
    session = None
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            session = await Pop3.connect(port)
            await session.command(f"USER {user}")
            await session.command(f"PASS {PASSWORD}")
            count = int((await session.command("STAT")).split()[1])
            stats.pop3_sessions += 1
            for n in range(1, count + 1):
                session.writer.write(b"RETR %d\r\nDELE %d\r\n" % (n, n))
                key = note_fetched(stats, user, await session.multiline(f"RETR {n}"))
                await session.status(f"DELE {n}")
                if cut:
                    stats.pop3_cut += 1
                    stats.cut_pending.add(key)
                    await close(session.writer, reset=True)
                    session = None
                    return count
            await session.command("QUIT")
            stats.deleted += count
            return count
    except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        stats.error("pop3", f"{user}: {type(e).__name__}: {e}")
        return -1
    finally:
        if session is not None:
            await close(session.writer)


async def pop3_fetcher(port: int, stats: Stats, interval: float, abort_every: int, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        for user in USERS:
            n += 1
            await pop3_session(port, user, stats, cut=abort_every > 0 and n % abort_every == 0)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def drain(port: int, stats: Stats) -> None:
    """
    After the load: empty every mailbox (twice over, in case a message
    arrived during the first pass).
    """
    for _ in range(3):
        counts = [await pop3_session(port, user, stats) for user in USERS]
        if all(c == 0 for c in counts):
            return


async def warm_logins(port: int, n: int, stats: Stats) -> None:
    async def one(user: str) -> None:
        try:
            session = await Pop3.connect(port)
            try:
                await session.command(f"USER {user}")
                await session.command(f"PASS {PASSWORD}")
                await session.command("QUIT")
            finally:
                await close(session.writer)
        except (OSError, ProtocolError) as e:
            stats.error("warm login", e)

    # Twice: glibc serves the first 16 MiB buffers by mmap and unmaps them
    # when freed, then raises its mmap threshold above 16 MiB, so only
    # the second round's buffers stay in the arenas.
    for _ in range(2):
        await asyncio.gather(*(one(user) for user in (USERS + WARM_USERS)[:n]))


# Abuse


async def smtp_bad_command(port: int, stats: Stats) -> None:
    reader, writer = await connect("127.0.0.1", port, ehlo="soak.abuse")
    try:
        code, lines = await command(reader, writer, "XYZZY plugh")
        if code // 100 != 5:
            raise ProtocolError(f"unknown command answered {reply_text(code, lines)!r}")
        check(*(await command(reader, writer, "QUIT")), 221, "QUIT")
    finally:
        await close(writer)


async def pop3_bad_command(port: int, stats: Stats) -> None:
    session = await Pop3.connect(port)
    try:
        session.writer.write(b"XYZZY plugh\r\n")
        line = await session.reader.readline()
        if not line.startswith(b"-ERR"):
            raise ProtocolError(f"unknown command answered {line[:80]!r}")
        await session.command("QUIT")
    finally:
        await close(session.writer)


async def cut_mid_data(port: int, stats: Stats, reset: bool) -> None:
    reader, writer = await connect("127.0.0.1", port, ehlo="soak.abuse")
    try:
        rcpt = random.choice(USERS)
        msgid = f"soak-cut.{time.monotonic_ns()}@bench.test"
        body = body_for(msgid, [rcpt], 8192)
        writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        await expect(reader, 250, "MAIL")
        await expect(reader, 250, "RCPT")
        await expect(reader, 354, "DATA")
        writer.write(body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)
    finally:
        await close(writer, reset=reset)


async def failed_login(port: int, pop3_port: int, stats: Stats, protocol: str) -> None:
    """
    A wrong password for a real user (so scrypt runs), answered after the
    throttle's growing delay.
    """
    user = "bob@localhost"
    if protocol == "smtp":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            extensions = await greet(reader, writer, ehlo="soak.abuse")
            if not any(line.upper().startswith(b"AUTH") for line in extensions):
                raise ProtocolError("AUTH not offered")
            token = base64.b64encode(f"\0{user}\0wrong-password".encode()).decode()
            check(*(await command(reader, writer, f"AUTH PLAIN {token}")), 535, "bad AUTH")
            check(*(await command(reader, writer, "QUIT")), 221, "QUIT")
        finally:
            await close(writer)
    else:
        session = await Pop3.connect(pop3_port)
        try:
            await session.command(f"USER {user}")
            session.writer.write(b"PASS wrong-password\r\n")
            line = await session.reader.readline()
            if not line.startswith(b"-ERR [AUTH]"):
                raise ProtocolError(f"bad PASS answered {line[:80]!r}")
            await session.command("QUIT")
        finally:
            await close(session.writer)


async def abuser(peer: MailServerPeer, stats: Stats, auth_every: float, stop: asyncio.Event) -> None:
    kinds = ["smtp bad command", "pop3 bad command", "cut mid-DATA (FIN)", "cut mid-DATA (RST)"]
    t0 = time.monotonic()
    tick = 0
    next_auth = t0 + auth_every / 2
    auth_turn = 0
    pending: set[asyncio.Task] = set()

    async def run(kind: str, coro) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                await coro
            stats.events[kind] += 1
        except (OSError, TimeoutError, ProtocolError, SMTPReplyError) as e:
            stats.error(kind, f"{type(e).__name__}: {e}")

    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 10.0)
            break
        except TimeoutError:
            pass
        kind = kinds[tick % len(kinds)]
        tick += 1
        if kind == "smtp bad command":
            coro = smtp_bad_command(peer.port, stats)
        elif kind == "pop3 bad command":
            coro = pop3_bad_command(peer.pop3_port, stats)
        else:
            coro = cut_mid_data(peer.port, stats, reset=kind.endswith("(RST)"))
        task = asyncio.ensure_future(run(kind, coro))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if time.monotonic() >= next_auth:
            next_auth += auth_every
            protocol = ("smtp", "pop3")[auth_turn % 2]
            auth_turn += 1
            task = asyncio.ensure_future(
                run(f"failed login ({protocol})", failed_login(peer.port, peer.pop3_port, stats, protocol))
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=TIMEOUT)


# Sampling


def fd_count(pid: int) -> int:
    total = 0
    for p in session_pids(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


ARENA_ALIGN = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit


def arena_kib(pid: int) -> int:
    """
    Resident KiB in glibc's per-thread malloc arenas: anonymous read-write
    mappings starting on a 64 MiB boundary (each arena heap reserves
    64 MiB so aligned).  A server thread that ran one scrypt check keeps
    its 16 MiB buffer there, free but resident.
    """
    total = 0
    for p in session_pids(pid):
        try:
            with open(f"/proc/{p}/smaps") as f:
                arena = False
                for line in f:
                    if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                        fields = line.split()
                        start = int(fields[0].split("-")[0], 16)
                        arena = len(fields) == 5 and fields[1] == "rw-p" and start % ARENA_ALIGN == 0
                    elif arena and line.startswith("Rss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def thread_count(pid: int) -> int:
    total = 0
    for p in session_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("Threads:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def maildir_files(peer: MailServerPeer) -> int:
    total = 0
    for user in USERS:
        for sub in ("new", "cur", "tmp"):
            try:
                total += len(os.listdir(peer.maildir(user) / sub))
            except FileNotFoundError:
                pass
    try:
        total += len(os.listdir(peer.data_path / "spool" / "tmp"))
    except FileNotFoundError:
        pass
    return total


def sample(peer: MailServerPeer, stats: Stats, t0: float) -> dict:
    pid = peer.pid
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "rss_kib": rss_kib(pid),
        "arena_kib": arena_kib(pid),
        "fds": fd_count(pid),
        "threads": thread_count(pid),
        "cpu_s": round(cpu_seconds(pid), 2),
        "maildir_files": maildir_files(peer),
        "loadavg": loadavg(),
        "attempted": stats.attempted,
        "accepted": stats.accepted,
        "fetched": stats.fetched,
        "inflight": stats.inflight,
        "errors": sum(stats.errors.values()),
    }


def progress(s: dict) -> str:
    return (
        f"{s['t_s'] / 60:5.1f} min  RSS {s['rss_kib'] / 1024:6.1f} MiB (arenas {s['arena_kib'] / 1024:5.1f})  fds {s['fds']:3d}  "
        f"threads {s['threads']:2d}  sent {s['attempted']:7d}  accepted {s['accepted']:7d}  "
        f"fetched {s['fetched']:7d}  in flight {s['inflight']:3d}  maildir files {s['maildir_files']:4d}  "
        f"errors {s['errors']}  load {' '.join(f'{x:.2f}' for x in s['loadavg'])}"
    )


async def sampler(peer: MailServerPeer, stats: Stats, t0: float, every: float, series: list, stop: asyncio.Event) -> None:
    next_print = 60.0
    while True:
        s = sample(peer, stats, t0)
        series.append(s)
        if s["t_s"] >= next_print - every / 2:
            print(progress(s), flush=True)
            next_print += 60.0
        try:
            await asyncio.wait_for(stop.wait(), every - (time.monotonic() - t0) % every)
            return
        except TimeoutError:
            pass


def robust_slope_per_min(points: list[tuple[float, float]]) -> float:
    """
    Theil-Sen slope (the median of the slopes between every two points) of
    (seconds, value) points, value units per minute.  A sample taken while
    a password check runs has its 16 MiB scrypt buffer in the RSS (mapped
    for the check's ~30 ms, then unmapped); a few such samples late in the
    window tilt a least-squares line by tens of KiB/min, but not the median.
    """
    slopes = sorted(
        (v2 - v1) / (t2 - t1)
        for i, (t1, v1) in enumerate(points)
        for t2, v2 in points[i + 1 :]
        if t2 != t1
    )
    if not slopes:
        return float("nan")
    middle = len(slopes) // 2
    median = slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2
    return median * 60.0


def level_kib(samples: list[dict], start: float, end: float, key=lambda s: s["rss_kib"]) -> float:
    """
    The median of C{key} over the samples from C{start} to C{end} seconds:
    a level that one sample inside a password check does not move.
    """
    values = sorted(key(s) for s in samples if start <= s["t_s"] <= end)
    return values[len(values) // 2]


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """
    Least-squares slope of (seconds, value) points, value units per minute.
    """
    n = len(points)
    if n < 2:
        return float("nan")
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return float("nan")
    return sum((t - mt) * (v - mv) for t, v in points) / den * 60.0


def server_log_lines(peer: MailServerPeer) -> tuple[Counter, list[str]]:
    """
    Log levels counted over twistd's logs (rotated ones too), and the lines
    at warn level and above, and tracebacks, as samples.
    """
    levels: Counter = Counter()
    samples: list[str] = []
    kinds: Counter = Counter()
    paths = sorted(peer.root.glob("twistd.log*")) + [peer.root / "server.log"]
    level_re = re.compile(r"#(debug|info|warn|error|critical)\]")
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = level_re.search(line)
            level = m.group(1) if m else None
            if level:
                levels[level] += 1
            bad = level in ("warn", "error", "critical") or "Traceback" in line or "Unhandled" in line
            if not bad:
                continue
            # One sample per distinct message shape (digits and ids folded).
            shape = re.sub(r"[0-9]+", "N", line.split("] ", 1)[-1])[:80]
            kinds[shape] += 1
            if kinds[shape] <= 2 and len(samples) < 30:
                samples.append(f"{path.name}: {line.strip()[:300]}")
    return levels, samples + [f"  x{n}: {shape}" for shape, n in kinds.most_common(15)]


# Main


async def soak(args, peer: MailServerPeer) -> dict:
    stats = Stats()
    series: list[dict] = []
    stop_load = asyncio.Event()
    stop_sampling = asyncio.Event()
    await warm_logins(peer.pop3_port, args.warm_logins, stats)
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu0 = cpu_seconds(peer.pid)
    sampling = asyncio.ensure_future(sampler(peer, stats, t0, args.sample, series, stop_sampling))
    load = [
        asyncio.ensure_future(smtp_driver(peer.port, stats, args.rate, args.max_inflight, stop_load)),
        asyncio.ensure_future(pop3_fetcher(peer.pop3_port, stats, args.pop3_interval, args.pop3_abort_every, stop_load)),
        asyncio.ensure_future(abuser(peer, stats, args.auth_fail_every, stop_load)),
    ]
    try:
        await asyncio.sleep(args.minutes * 60)
    finally:
        stop_load.set()
        await asyncio.gather(*load, return_exceptions=True)
        load_s = time.monotonic() - t0
        server_cpu = cpu_seconds(peer.pid) - server_cpu0
        await drain(peer.pop3_port, stats)
        stop_sampling.set()
        await sampling
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    final = sample(peer, stats, t0)
    final["after_drain"] = True
    series.append(final)
    for task in load:
        if task.exception() is not None:
            stats.error("client crashed", repr(task.exception()))
    return {
        "stats": stats,
        "series": series,
        "load_s": load_s,
        "server_cpu_s": server_cpu,
        "client_cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def report(args, peer: MailServerPeer, run: dict, load_start: list[float]) -> bool:
    stats: Stats = run["stats"]
    series = [s for s in run["series"] if not s.get("after_drain")]
    final = run["series"][-1]
    load_s = run["load_s"]
    in_load = [s for s in series if s["t_s"] <= load_s + 1]
    warm = next((s for s in in_load if s["t_s"] >= min(60.0, load_s / 3)), in_load[0])
    end = in_load[-1]
    peak = max(in_load, key=lambda s: s["rss_kib"])
    tail = [s for s in in_load if s["t_s"] >= load_s / 3]
    rss_points = [(s["t_s"], s["rss_kib"]) for s in tail]
    rss_slope = robust_slope_per_min(rss_points)
    rss_ls_slope = slope_per_min(rss_points)
    fd_slope = slope_per_min([(s["t_s"], s["fds"]) for s in tail])
    # The levels at warm-up and at the end: medians over a minute.
    warm_span = (warm["t_s"], warm["t_s"] + 60.0)
    end_span = (end["t_s"] - 60.0, end["t_s"])
    rise_mib = (level_kib(in_load, *end_span) - level_kib(in_load, *warm_span)) / 1024
    tail_median = level_kib(tail, 0, math.inf)
    in_check = sum(1 for s in tail if s["rss_kib"] > tail_median + 8 * 1024)
    rest = lambda s: s["rss_kib"] - s["arena_kib"]  # noqa: E731
    rest_slope = robust_slope_per_min([(s["t_s"], rest(s)) for s in tail])
    rest_rise_mib = (level_kib(in_load, *end_span, key=rest) - level_kib(in_load, *warm_span, key=rest)) / 1024
    arena_rise_mib = (end["arena_kib"] - warm["arena_kib"]) / 1024
    fd_rise = end["fds"] - warm["fds"]
    loads = [s["loadavg"][0] for s in in_load]
    missing = sum(len(v) for v in stats.expected.values())

    print()
    print(f"== soak: {load_s / 60:.1f} min of load, {len(in_load)} samples every {args.sample:g} s ==")
    print(
        f"load: {args.rate:g} msgs/s offered (1-10 KiB, new connection each; 8% to 2 users, 2% to 4), "
        f"POP3 fetch of each of {len(USERS)} mailboxes every {args.pop3_interval:g} s, an abuse event every 10 s, "
        f"a failed login every {args.auth_fail_every:g} s"
    )
    print(
        f"RSS: {warm['rss_kib'] / 1024:.1f} MiB at {warm['t_s'] / 60:.1f} min (warm), "
        f"{end['rss_kib'] / 1024:.1f} MiB at the end ({end['t_s'] / 60:.1f} min), "
        f"max {peak['rss_kib'] / 1024:.1f} MiB at {peak['t_s'] / 60:.1f} min, "
        f"min after warm-up {min(s['rss_kib'] for s in in_load if s['t_s'] >= warm['t_s']) / 1024:.1f} MiB; "
        f"end - warm (medians over a minute) {rise_mib:+.2f} MiB; after the drain {final['rss_kib'] / 1024:.1f} MiB"
    )
    print(
        f"RSS slope over the last 2/3 ({tail[0]['t_s'] / 60:.1f}-{tail[-1]['t_s'] / 60:.1f} min, "
        f"{len(tail)} samples): {rss_slope:+.1f} KiB/min (Theil-Sen; least squares {rss_ls_slope:+.1f}, "
        f"with {in_check} samples over 8 MiB above the median, taken during a password check)"
    )
    print(
        f"  of which in malloc thread arenas: {warm['arena_kib'] / 1024:.1f} MiB warm, {end['arena_kib'] / 1024:.1f} MiB end "
        f"({arena_rise_mib:+.1f} MiB = {arena_rise_mib / 16:+.1f} x 16 MiB scrypt buffers), "
        f"{final['arena_kib'] / 1024:.1f} MiB after the drain; outside them: {rest(warm) / 1024:.1f} MiB warm, "
        f"{rest(end) / 1024:.1f} MiB end ({rest_rise_mib:+.2f} MiB), max {max(rest(s) for s in in_load) / 1024:.1f} MiB, "
        f"slope {rest_slope:+.1f} KiB/min"
    )
    print(
        f"fds: {warm['fds']} warm, {end['fds']} end, max {max(s['fds'] for s in in_load)}, "
        f"{final['fds']} after the drain; slope {fd_slope:+.2f}/min; "
        f"threads {warm['threads']} warm, {end['threads']} end, max {max(s['threads'] for s in in_load)}"
    )
    print(
        f"maildir files: max {max(s['maildir_files'] for s in in_load)}, {final['maildir_files']} after the drain"
    )
    print(
        f"SMTP: {stats.attempted} sent, {stats.accepted} accepted ({stats.accepted / load_s:.1f}/s), "
        f"{stats.accepted_rcpts} (message, recipient) deliveries, {stats.skipped} not started (in-flight cap)"
    )
    print(
        f"POP3: {stats.pop3_sessions} sessions ({stats.pop3_cut} cut after a RETR+DELE), "
        f"{stats.fetched} RETRs = {stats.fetched_unique} deliveries fetched + {stats.duplicates} again after a cut session; "
        f"{stats.deleted} deleted at QUIT; DELEd in a cut session and not seen again: {len(stats.cut_pending)}; missing (accepted, never fetched): {missing}; "
        f"unexpected (never accepted, or cut mid-DATA): {stats.unexpected}"
    )
    print(f"abuse events done as expected: {dict(sorted(stats.events.items()))}")
    errors = sum(stats.errors.values())
    print(f"errors: {errors} {dict(stats.errors) if errors else ''}")
    for e in stats.error_samples[:10]:
        print(f"  {e}")
    print(
        f"CPU: server {run['server_cpu_s']:.0f} s ({run['server_cpu_s'] / load_s:.2f} cores, "
        f"{run['server_cpu_s'] * 1000 / max(1, stats.accepted):.2f} ms/msg), "
        f"this client {run['client_cpu_s']:.0f} s ({run['client_cpu_s'] / load_s:.2f} cores)"
    )
    print(
        f"/proc/loadavg: {' '.join(map(str, load_start))} at the start, "
        f"{' '.join(map(str, end['loadavg']))} at the end; 1-min average over the run "
        f"mean {sum(loads) / len(loads):.2f}, max {max(loads):.2f} ({os.cpu_count()} CPUs)"
    )
    levels, lines = server_log_lines(peer)
    print(f"server log: levels {dict(levels)}; warnings/errors/tracebacks by kind:")
    for line in lines:
        print(f"  {line}")
    tracebacks = any("Traceback" in l or "Unhandled" in l or "#critical]" in l or "#error]" in l for l in lines)

    checks = {
        f"RSS slope < {args.max_slope_kib:g} KiB/min": rss_slope < args.max_slope_kib,
        f"end - warm RSS < {args.max_rise_mib:g} MiB": rise_mib < args.max_rise_mib,
        "fds end - warm < 20 and fd slope < 1/min": fd_rise < 20 and fd_slope < 1.0,
        "no client errors": errors == 0,
        "every accepted delivery fetched once, nothing unexpected": missing == 0 and stats.unexpected == 0,
        "a cut session deletes nothing": not stats.cut_pending,
        "no error/critical/traceback in the server log": not tracebacks,
    }
    print("checks: " + "; ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    fds_ok = checks["fds end - warm < 20 and fd slope < 1/min"]
    rss_ok = rss_slope < args.max_slope_kib and rise_mib < args.max_rise_mib
    rest_ok = rest_slope < args.max_slope_kib and rest_rise_mib < args.max_rise_mib
    steps = arena_rise_mib / 16
    if rss_ok and fds_ok:
        verdict = "no growth"
    elif rest_ok and fds_ok and round(steps) >= 1 and abs(steps - round(steps)) < 0.15:
        # The whole rise is whole scrypt buffers kept in new malloc arenas.
        verdict = (
            f"no growth outside the malloc thread arenas; RSS rose by {round(steps)} x 16 MiB "
            f"scrypt buffers kept by arenas (bounded by the arena count, not by time)"
        )
    else:
        verdict = "GROWTH"
    print(f"verdict: {verdict}{'' if all(checks.values()) else ' (failed checks above)'}")
    return all(checks.values()) or (verdict != "GROWTH" and all(v for k, v in checks.items() if "RSS" not in k))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Soak our server at steady load; watch RSS and fds for growth.")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=100.0, help="SMTP messages per second offered")
    p.add_argument("--max-inflight", type=int, default=200)
    p.add_argument("--pop3-interval", type=float, default=5.0, help="seconds between POP3 rounds")
    p.add_argument("--pop3-abort-every", type=int, default=25, help="cut every Nth POP3 session (0: never)")
    p.add_argument("--auth-fail-every", type=float, default=60.0, help="seconds between failed logins")
    p.add_argument(
        "--warm-logins",
        type=int,
        default=10,
        help="POP3 logins at once before the load (10: at least every thread that checks passwords)",
    )
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--max-slope-kib", type=float, default=50.0)
    p.add_argument("--max-rise-mib", type=float, default=5.0)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. MALLOC_MMAP_THRESHOLD_=1048576 (glibc then "
        "returns every freed buffer of 1 MiB or more at once: no 16 MiB scrypt steps)",
    )
    p.add_argument("--json", help="write the sample series and the counters here")
    p.add_argument("--keep", action="store_true", help="keep the server's folder (logs, Maildirs)")
    args = p.parse_args(argv)
    if AUTH_WINDOW / args.auth_fail_every >= AUTH_LIMIT:
        p.error(f"--auth-fail-every {args.auth_fail_every:g}: that many failures in {AUTH_WINDOW} s would get 127.0.0.1 refused")
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--server-env {item!r}: not NAME=VALUE")
        os.environ[name] = value  # MailServerPeer passes its environment on to the server
    load_start = loadavg()
    print(f"loadavg at start: {' '.join(map(str, load_start))}, {os.cpu_count()} CPUs", flush=True)
    ok = False
    users = USERS + WARM_USERS[: max(0, args.warm_logins - len(USERS))]
    with MailServerPeer(users=users, password=PASSWORD, keep=args.keep) as peer:
        print(
            f"server pid {peer.pid}, SMTP {peer.port}, POP3 {peer.pop3_port}, folder {peer.root}; "
            f"{args.minutes:g} min at {args.rate:g} msgs/s"
            + (f", server environment {' '.join(args.server_env)}" if args.server_env else ""),
            flush=True,
        )
        loop = new_event_loop()
        try:
            run = loop.run_until_complete(soak(args, peer))
        finally:
            loop.close()
        ok = report(args, peer, run, load_start)
        if args.json:
            stats: Stats = run["stats"]
            Path(args.json).write_text(
                json.dumps(
                    {
                        "args": vars(args),
                        "series": run["series"],
                        "load_s": run["load_s"],
                        "server_cpu_s": run["server_cpu_s"],
                        "client_cpu_s": run["client_cpu_s"],
                        "counters": {
                            k: v for k, v in vars(stats).items()
                            if k not in ("expected", "fetched_ids", "cut_pending", "events", "errors")
                        }
                        | {"events": dict(stats.events), "errors": dict(stats.errors)},
                    },
                    indent=1,
                )
            )
            print(f"series written to {args.json}")
    if args.keep:
        print(f"kept: {peer.root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
