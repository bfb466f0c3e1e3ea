"""
POP3 benchmark tools: fill a Maildir directly, fetch whole mailboxes with
several clients, time the listing commands on a big mailbox.

 - L{fill_maildir}: writes C{count} messages straight into C{new/}, named
   C{<unique>,S=<LF size>,W=<CRLF size>} as our server names them (no SMTP,
   no fsync: it's test data).
 - L{run_pop3_load}: one client per mailbox (a mailbox is locked per
   session), each doing USER/PASS, LIST, UIDL, RETR of every message, QUIT.
   RETRs are pipelined (a window of C{window} commands in flight) only if
   CAPA advertises PIPELINING; otherwise lockstep.
 - L{time_listing}: on one mailbox, how long PASS (the server lists the
   Maildir at login), STAT, LIST and UIDL each take.

Only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smtp_load import run_async

MAX_MESSAGES_PER_MAILBOX = 1_000_000
_STREAM_LIMIT = 64 << 20  # a 100,000-message LIST is ~1.5 MB; RETRs are small


class POP3Error(Exception):
    pass


def message_bytes(size: int, seq: int) -> bytes:
    """
    A message in LF form whose CRLF form is exactly C{size} octets (or a
    little more, for tiny sizes), no line starting with a dot.
    """
    header = (
        f"From: <sender@bench.test>\n"
        f"To: <bob@localhost>\n"
        f"Subject: pop3 bench message {seq}\n"
        f"Message-ID: <pop3bench.{seq}@bench.test>\n"
        f"\n"
    ).encode("ascii")
    crlf = len(header) + header.count(b"\n")
    remaining = size - crlf
    if remaining <= 0:
        return header
    line = b"x" * 74 + b"\n"  # 76 octets in CRLF form
    full, rest = divmod(remaining, 76)
    tail = b""
    if rest >= 3:
        tail = b"y" * (rest - 2) + b"\n"
    elif rest and full:
        full -= 1
        tail = b"y" * (rest + 76 - 2) + b"\n"
    return header + line * full + tail


def fill_maildir(path: Path, count: int, size: int, tag: str = "bench") -> int:
    """
    Create C{path}/{tmp,new,cur} and write C{count} messages into C{new/}.
    Returns the total CRLF octets.
    """
    count = min(count, MAX_MESSAGES_PER_MAILBOX)
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    new = path / "new"
    base = int(time.time()) - count // 1000 - 10
    total = 0
    body_cache: dict[int, bytes] = {}
    for i in range(count):
        data = body_cache.get(i % 10)
        if data is None:
            data = body_cache[i % 10] = message_bytes(size, i % 10)
        crlf = len(data) + data.count(b"\n")
        # Strictly increasing delivery order: seconds, then microseconds.
        name = f"{base + i // 1000}.M{(i % 1000) * 1000}P{os.getpid()}Q{i}.{tag}"
        fd = os.open(new / f"{name},S={len(data)},W={crlf}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        total += crlf
    return total


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if not line.endswith(b"\n"):
            raise POP3Error("connection closed")
        return line

    async def status(self, what: str) -> bytes:
        line = await self.line()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{what}: {line[:120]!r}")
        return line

    async def multiline(self, what: str) -> bytes:
        """
        A +OK status line and its dot-terminated body; returns the body
        (still dot-stuffed, terminator removed).
        """
        await self.status(what)
        buf = b""
        for _ in range(10_000_000):  # bounded; each pass consumes input
            buf += await asyncio.wait_for(self.reader.readuntil(b".\r\n"), self.timeout)
            if buf == b".\r\n":
                return b""
            if buf.endswith(b"\r\n.\r\n"):
                return buf[:-3]
        raise POP3Error(f"{what}: response too long")

    async def command(self, text: str, what: str | None = None) -> bytes:
        self.writer.write(text.encode("ascii") + b"\r\n")
        return await self.status(what or text.split()[0])


@dataclass
class Pop3Result:
    clients: int
    messages: int = 0  # RETRs answered +OK with the LISTed size
    octets: int = 0
    errors: int = 0
    size_mismatches: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    pipelining: bool | None = None
    client_cpu_s: float = 0.0  # CPU time of this (client) process
    # USER+PASS round trips, one per session: the password check's cost
    # (the servers hash passwords differently; see bench/README.md).
    login_s: list[float] = field(default_factory=list)
    # Each session's span from its PASS answer to its QUIT answer.
    fetch_spans: list[tuple[float, float]] = field(default_factory=list)

    @property
    def fetch_msgs_per_s(self) -> float:
        """
        Messages over the time from the first session's login answer to
        the last one's QUIT: the fetching alone, password checks left out.
        """
        if not self.fetch_spans:
            return 0.0
        span = max(e for _, e in self.fetch_spans) - min(s for s, _ in self.fetch_spans)
        return self.messages / span if span > 0 else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.octets / self.elapsed_s / 1048576 if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d.update(msgs_per_s=self.msgs_per_s, mib_per_s=self.mib_per_s,
                 fetch_msgs_per_s=self.fetch_msgs_per_s)
        return d

    def __str__(self) -> str:
        return (
            f"{self.messages} msgs ({self.octets / 1048576:.1f} MiB) in {self.elapsed_s:.2f}s = "
            f"{self.msgs_per_s:.0f} msgs/s, {self.mib_per_s:.1f} MiB/s, errors {self.errors}, "
            f"size mismatches {self.size_mismatches}, pipelining {self.pipelining}, "
            f"client CPU {self.client_cpu_s:.2f}s"
            f"{' (e.g. ' + self.error_samples[0] + ')' if self.error_samples else ''}"
        )


async def _connect(port: int, timeout: float) -> _Session:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=_STREAM_LIMIT), timeout
    )
    session = _Session(reader, writer, timeout)
    await session.status("greeting")
    return session


async def _close(session: _Session) -> None:
    session.writer.close()
    try:
        await asyncio.wait_for(session.writer.wait_closed(), session.timeout)
    except (TimeoutError, OSError):
        pass


def _parse_listing(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    for line in body.split(b"\r\n"):
        if line:
            number, _, value = line.partition(b" ")
            out.append((int(number), value))
    return out


async def _fetch_mailbox(port: int, user: str, password: str, window: int, timeout: float, result: Pop3Result) -> None:
    session = await _connect(port, timeout)
    try:
        session.writer.write(b"CAPA\r\n")
        capa = await session.multiline("CAPA")
        pipelining = b"\r\nPIPELINING\r\n" in b"\r\n" + capa
        result.pipelining = pipelining
        started = time.perf_counter()
        await session.command(f"USER {user}")
        await session.command(f"PASS {password}")
        fetching = time.perf_counter()
        result.login_s.append(fetching - started)
        session.writer.write(b"LIST\r\n")
        sizes = {n: int(v) for n, v in _parse_listing(await session.multiline("LIST"))}
        session.writer.write(b"UIDL\r\n")
        uids = _parse_listing(await session.multiline("UIDL"))
        if len(uids) != len(sizes):
            raise POP3Error(f"UIDL lists {len(uids)} messages, LIST {len(sizes)}")
        numbers = sorted(sizes)
        depth = window if pipelining else 1
        sent = 0
        for i, number in enumerate(numbers):
            while sent < len(numbers) and sent < i + depth:
                session.writer.write(b"RETR %d\r\n" % numbers[sent])
                sent += 1
            try:
                body = await session.multiline(f"RETR {number}")
            except POP3Error as e:
                result.errors += 1
                if len(result.error_samples) < 10:
                    result.error_samples.append(str(e)[:200])
                continue
            # Octets before byte-stuffing; the LIST size is in CRLF form.
            octets = len(body) - body.count(b"\r\n..") - (1 if body.startswith(b"..") else 0)
            if octets != sizes[number]:
                result.size_mismatches += 1
            result.messages += 1
            result.octets += octets
        await session.command("QUIT")
        result.fetch_spans.append((fetching, time.perf_counter()))
    finally:
        await _close(session)


async def run_pop3_load_async(
    port: int, users: list[str], password: str, *, window: int = 8, timeout: float = 60.0
) -> Pop3Result:
    """
    One client per user, all at once; each fetches its whole mailbox.
    """
    result = Pop3Result(clients=len(users))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(_fetch_mailbox(port, u, password, window, timeout, result))
        for u in users
    ]
    _, pending = await asyncio.wait(tasks, timeout=600)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    result.elapsed_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    for t in tasks:
        if t.cancelled():
            result.errors += 1
            result.error_samples.append("client cancelled at the 600 s limit")
        elif t.exception() is not None:
            result.errors += 1
            result.error_samples.append(f"{type(t.exception()).__name__}: {t.exception()}"[:200])
    return result


def run_pop3_load(port: int, users: list[str], password: str, **kwargs) -> Pop3Result:
    return run_async(run_pop3_load_async(port, users, password, **kwargs))


async def time_listing_async(port: int, user: str, password: str, timeout: float = 120.0) -> dict:
    """
    Seconds for PASS, STAT, LIST and UIDL on one session, and what they
    reported (message count, lines listed).
    """
    session = await _connect(port, timeout)
    out: dict = {}
    try:
        await session.command(f"USER {user}")
        t = time.perf_counter()
        await session.command(f"PASS {password}")
        out["pass_s"] = time.perf_counter() - t
        t = time.perf_counter()
        stat = await session.command("STAT")
        out["stat_s"] = time.perf_counter() - t
        out["stat"] = stat.decode("ascii", "replace").strip()
        for cmd in ("LIST", "UIDL"):
            t = time.perf_counter()
            session.writer.write(cmd.encode() + b"\r\n")
            body = await session.multiline(cmd)
            out[f"{cmd.lower()}_s"] = time.perf_counter() - t
            out[f"{cmd.lower()}_lines"] = body.count(b"\r\n")
        await session.command("QUIT")
    finally:
        await _close(session)
    return out


def time_listing(port: int, user: str, password: str, **kwargs) -> dict:
    return run_async(time_listing_async(port, user, password, **kwargs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fetch whole POP3 mailboxes with one client each.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", action="append", required=True, help="repeat for more clients")
    p.add_argument("--password", required=True)
    p.add_argument("--window", type=int, default=8, help="RETRs in flight if PIPELINING")
    args = p.parse_args(argv)
    result = run_pop3_load(args.port, args.user, args.password, window=args.window)
    print(result)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
