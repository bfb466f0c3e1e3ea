"""
An SMTP load generator in the manner of Postfix's C{smtp-source}: N
concurrent clients, each opening one connection per message.

Per message: connect, read the 220 greeting, EHLO, MAIL FROM, RCPT TO, DATA,
the body, QUIT.  MAIL/RCPT/DATA are sent in one write only if the server
advertises PIPELINING in its EHLO reply (RFC 2920); otherwise each command
waits for its reply.

The latency of a message runs from the start of C{connect()} to the 250
reply after the body's final dot.  A message counts as an error if any reply
on its way is not the one expected (220, 250, 250, 250, 354, 250), or if the
connection fails or times out; the QUIT reply is read but a bad one is only
counted in C{quit_errors}, since the message was already accepted.

Use as a library::

    from bench.smtp_load import run_load
    result = run_load("127.0.0.1", 2525, clients=50, messages=3000, size=1024)
    print(result.msgs_per_s, result.p50_ms, result.p99_ms)

or as a script::

    .venv/bin/python bench/smtp_load.py --port 2525 --clients 50 --messages 3000 --size 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smtp_client import SMTPReplyError, check, command, expect, greet, read_reply

# Hard bounds, whatever the caller asks for.
MAX_MESSAGES = 10_000_000
MAX_DURATION = 3600.0
MAX_CLIENTS = 5000


def percentile(ordered: list[float], q: float) -> float:
    """
    Nearest-rank percentile of an already sorted list (NaN if empty).
    """
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    host: str
    port: int
    clients: int
    size: int  # octets per message as sent (CRLF form, without the final dot)
    sent_ok: int = 0
    errors: int = 0
    quit_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    pipelining: bool | None = None  # None: no EHLO reply was ever seen
    client_cpu_s: float = 0.0  # CPU time of this (load generator) process
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def msgs_per_s(self) -> float:
        return self.sent_ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """
        Nearest-rank percentile of the successful messages' latencies.
        """
        return percentile(sorted(self.latencies_ms), q)

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("latencies_ms")
        d.update(msgs_per_s=self.msgs_per_s, p50_ms=self.p50_ms, p99_ms=self.p99_ms)
        return d

    def __str__(self) -> str:
        return (
            f"{self.sent_ok} msgs in {self.elapsed_s:.2f}s = {self.msgs_per_s:.0f} msgs/s, "
            f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, errors {self.errors}"
            f"{' (e.g. ' + self.error_samples[0] + ')' if self.error_samples else ''}, "
            f"pipelining {self.pipelining}, load generator CPU {self.client_cpu_s:.2f}s"
        )


def make_body(size: int, seq: int, mail_from: str, rcpt_to: str) -> bytes:
    """
    A message of exactly C{size} octets in CRLF form (headers included,
    final dot excluded), with no line starting with a dot, so no stuffing.
    """
    header = (
        f"From: <{mail_from}>\r\n"
        f"To: <{rcpt_to}>\r\n"
        f"Subject: bench message {seq}\r\n"
        f"Message-ID: <bench.{os.getpid()}.{seq}@bench.test>\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"\r\n"
    ).encode("ascii")
    remaining = size - len(header)
    if remaining < 2:
        return header
    line = b"x" * 74 + b"\r\n"  # 76 octets per line
    full, rest = divmod(remaining, len(line))
    tail = b""
    if rest:
        # Always end in CRLF; a short last line of at least "y\r\n".
        if rest < 3:
            # Make room by shortening one full line.
            if full:
                full -= 1
                rest += len(line)
            else:
                return header + b"y" * (rest - 2) + b"\r\n" if rest >= 2 else header
        tail = b"y" * (rest - 2) + b"\r\n"
    return header + line * full + tail


@dataclass
class _Shared:
    remaining: int
    deadline: float
    result: LoadResult
    seq: int = 0


async def _one_message(
    host: str,
    port: int,
    body: bytes,
    mail_from: str,
    rcpt_to: str,
    timeout: float,
    use_pipelining: str,
    shared: _Shared,
) -> float:
    """
    Send one message on a fresh connection; return its latency in seconds.
    """
    start = time.perf_counter()
    # One deadline for the whole message (asyncio.timeout is much cheaper
    # than a wait_for, which makes a task, around every read).
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            lines = await greet(reader, writer, ehlo="bench.client")
            advertised = any(l.split(b" ", 1)[0].upper() == b"PIPELINING" for l in lines[1:])
            pipelining = advertised if use_pipelining == "auto" else use_pipelining == "on"
            shared.result.pipelining = pipelining
            mail = f"MAIL FROM:<{mail_from}> SIZE={len(body)}\r\n".encode("ascii")
            rcpt = f"RCPT TO:<{rcpt_to}>\r\n".encode("ascii")
            if pipelining:
                writer.write(mail + rcpt + b"DATA\r\n")
                replies = [await read_reply(reader) for _ in range(3)]
                check(*replies[0], 250, "MAIL")
                check(*replies[1], 250, "RCPT")
                check(*replies[2], 354, "DATA")
            else:
                writer.write(mail)
                await expect(reader, 250, "MAIL")
                writer.write(rcpt)
                await expect(reader, 250, "RCPT")
                writer.write(b"DATA\r\n")
                await expect(reader, 354, "DATA")
            writer.write(body)
            writer.write(b".\r\n")
            await expect(reader, 250, "end of DATA")
            latency = time.perf_counter() - start
            try:
                code, lines = await command(reader, writer, b"QUIT")
                if code != 221:
                    shared.result.quit_errors += 1
            except (OSError, SMTPReplyError):
                shared.result.quit_errors += 1
            return latency
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


class _SMTPClient(asyncio.Protocol):
    """
    The same conversation as L{_one_message}, as a callback state machine:
    about half the load generator's CPU per message of the streams version,
    which matters when it shares 2 cores with the server under test.
    """

    def __init__(self, body: bytes, mail: bytes, rcpt: bytes, use_pipelining: str, done: asyncio.Future):
        self.body = body
        self.mail = mail
        self.rcpt = rcpt
        self.use_pipelining = use_pipelining
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.lines: list[bytes] = []
        self.expect: list[tuple[int, str]] = [(220, "greeting")]
        self.step = "greeting"
        self.start = time.perf_counter()
        self.latency: float | None = None
        self.pipelining: bool | None = None
        self.quit_ok = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self._fail(SMTPReplyError("reply line too long"))
                return
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if len(line) < 4 or not line[:3].isdigit():
                self._fail(SMTPReplyError(f"malformed reply line {line!r}"))
                return
            self.lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] == b"-":
                if len(self.lines) > 1000:
                    self._fail(SMTPReplyError("reply too long"))
                    return
                continue
            code, lines = int(line[:3]), self.lines
            self.lines = []
            self._reply(code, lines)
            if self.done.done():
                return

    def _fail(self, error: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def _reply(self, code: int, lines: list[bytes]) -> None:
        wanted, step = self.expect.pop(0)
        self.step = step
        if step == "QUIT":
            self.quit_ok = code == 221
            self.transport.close()
            if not self.done.done():
                self.done.set_result(self)
            return
        if code != wanted:
            text = b" ".join(lines).decode("ascii", "replace")[:120]
            self._fail(SMTPReplyError(f"{step}: {code} {text}"))
            return
        write = self.transport.write
        if step == "greeting":
            write(b"EHLO bench.client\r\n")
            self.expect.append((250, "EHLO"))
        elif step == "EHLO":
            advertised = any(l.split(b" ", 1)[0].upper() == b"PIPELINING" for l in lines[1:])
            mode = self.use_pipelining
            self.pipelining = advertised if mode == "auto" else mode == "on"
            if self.pipelining:
                write(self.mail + self.rcpt + b"DATA\r\n")
                self.expect += [(250, "MAIL"), (250, "RCPT"), (354, "DATA")]
            else:
                write(self.mail)
                self.expect.append((250, "MAIL"))
        elif step == "MAIL" and not self.pipelining:
            write(self.rcpt)
            self.expect.append((250, "RCPT"))
        elif step == "RCPT" and not self.pipelining:
            write(b"DATA\r\n")
            self.expect.append((354, "DATA"))
        elif step == "DATA":
            write(self.body)
            write(b".\r\n")
            self.expect.append((250, "end of DATA"))
        elif step == "end of DATA":
            self.latency = time.perf_counter() - self.start
            write(b"QUIT\r\n")
            self.expect.append((221, "QUIT"))

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            if self.latency is not None:
                # Accepted; only the QUIT reply went missing.
                self.done.set_result(self)
            else:
                self.done.set_exception(SMTPReplyError(f"connection lost waiting for {self.expect[:1]}: {exc}"))


async def _one_message_protocol(
    host: str,
    port: int,
    body: bytes,
    mail_from: str,
    rcpt_to: str,
    timeout: float,
    use_pipelining: str,
    shared: _Shared,
) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    mail = f"MAIL FROM:<{mail_from}> SIZE={len(body)}\r\n".encode("ascii")
    rcpt = f"RCPT TO:<{rcpt_to}>\r\n".encode("ascii")
    client = _SMTPClient(body, mail, rcpt, use_pipelining, done)
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: client, host, port)
            await done
    finally:
        if transport is not None and not done.done():
            transport.abort()
        if client.pipelining is not None:
            shared.result.pipelining = client.pipelining
    if not client.quit_ok:
        shared.result.quit_errors += 1
    assert client.latency is not None
    return client.latency


async def _client(
    host: str,
    port: int,
    size: int,
    mail_from: str,
    rcpt_to: str,
    timeout: float,
    use_pipelining: str,
    shared: _Shared,
    engine: str = "protocol",
) -> None:
    result = shared.result
    send = _one_message_protocol if engine == "protocol" else _one_message
    while shared.remaining > 0 and time.monotonic() < shared.deadline:
        shared.remaining -= 1
        shared.seq += 1
        body = make_body(size, shared.seq, mail_from, rcpt_to)
        try:
            latency = await send(
                host, port, body, mail_from, rcpt_to, timeout, use_pipelining, shared
            )
        except (TimeoutError, OSError, SMTPReplyError, asyncio.IncompleteReadError) as e:
            result.errors += 1
            if len(result.error_samples) < 10:
                result.error_samples.append(f"{type(e).__name__}: {e}"[:200])
            # Don't spin on a dead server: a short pause after each failure.
            await asyncio.sleep(0.01)
            continue
        result.sent_ok += 1
        result.latencies_ms.append(latency * 1000.0)


async def run_load_async(
    host: str = "127.0.0.1",
    port: int = 2525,
    *,
    clients: int = 50,
    messages: int | None = 1000,
    duration: float | None = None,
    size: int = 1024,
    mail_from: str = "sender@bench.test",
    rcpt_to: str = "bob@localhost",
    timeout: float = 30.0,
    pipelining: str = "auto",
    engine: str = "protocol",
) -> LoadResult:
    """
    Run the load; stop after C{messages} attempts or C{duration} seconds,
    whichever comes first (at least one of them must be given).

    C{engine}: "protocol" (a callback state machine, the cheaper) or
    "streams" (asyncio streams); both hold the same conversation.
    """
    if engine not in ("protocol", "streams"):
        raise ValueError("engine is protocol or streams")
    if host != "127.0.0.1":
        raise ValueError("this benchmark only ever connects to 127.0.0.1")
    if messages is None and duration is None:
        raise ValueError("give messages or duration")
    if pipelining not in ("auto", "on", "off"):
        raise ValueError("pipelining is auto, on or off")
    clients = max(1, min(clients, MAX_CLIENTS))
    total = min(messages if messages is not None else MAX_MESSAGES, MAX_MESSAGES)
    span = min(duration if duration is not None else MAX_DURATION, MAX_DURATION)
    result = LoadResult(host=host, port=port, clients=clients, size=size)
    shared = _Shared(remaining=total, deadline=time.monotonic() + span, result=result)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(
            _client(host, port, size, mail_from, rcpt_to, timeout, pipelining, shared, engine)
        )
        for _ in range(min(clients, total))
    ]
    # Each client stops at the deadline; allow in-flight messages to finish
    # their own timeouts, then give up on stragglers.
    done, pending = await asyncio.wait(tasks, timeout=span + 4 * timeout + 5)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        result.errors += len(pending)
        result.error_samples.append(f"{len(pending)} clients cancelled at the hard limit")
    for t in done:
        if t.exception() is not None:
            result.errors += 1
            result.error_samples.append(f"client crashed: {t.exception()!r}"[:200])
    result.elapsed_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return result


def new_event_loop() -> asyncio.AbstractEventLoop:
    """
    uvloop if installed and C{BENCH_UVLOOP} is not 0 (it makes the load
    generator cheaper, leaving more of the 2 cores to the server), else the
    stock loop.
    """
    if os.environ.get("BENCH_UVLOOP", "1") != "0":
        try:
            import uvloop  # type: ignore[import-not-found]

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def loop_kind() -> str:
    """
    Which event loop L{new_event_loop} gives: "uvloop" or "asyncio".
    """
    loop = new_event_loop()
    try:
        return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    finally:
        loop.close()


def run_async(coro):
    """
    Run a coroutine to completion on a fresh loop (see L{new_event_loop}).
    """
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def run_load(host: str = "127.0.0.1", port: int = 2525, **kwargs) -> LoadResult:
    """
    Blocking wrapper of L{run_load_async}; same arguments.
    """
    return run_async(run_load_async(host, port, **kwargs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", "-c", type=int, default=50)
    p.add_argument("--messages", "-m", type=int, default=None)
    p.add_argument("--duration", "-d", type=float, default=None, help="seconds")
    p.add_argument("--size", "-s", type=int, default=1024, help="octets per message")
    p.add_argument("--from", dest="mail_from", default="sender@bench.test")
    p.add_argument("--to", dest="rcpt_to", default="bob@localhost")
    p.add_argument("--timeout", type=float, default=30.0, help="per message, seconds")
    p.add_argument("--pipelining", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--engine", choices=["protocol", "streams"], default="protocol")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.messages is None and args.duration is None:
        args.messages = 1000
    result = run_load(
        args.host,
        args.port,
        clients=args.clients,
        messages=args.messages,
        duration=args.duration,
        size=args.size,
        mail_from=args.mail_from,
        rcpt_to=args.rcpt_to,
        timeout=args.timeout,
        pipelining=args.pipelining,
        engine=args.engine,
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(result)
        for sample in result.error_samples:
            print("  error:", sample)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
