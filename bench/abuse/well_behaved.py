"""
The well-behaved clients, in a process of their own so that the load
generator's busy event loop (thousands of slow clients, the floods) does not
add to the latency they measure: an SMTP client sending a message over a new
connection every C{--interval} seconds, timing each step, and a POP3 client
logging in and STATing every few seconds.

The phase starts this module as C{python -m bench.abuse.well_behaved CONFIG};
it prints one JSON line per message or POP3 session until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.abuse.common import GOOD_USER, HOST, PASSWORD
from bench.smtp_client import SMTPReplyError, command, expect
from bench.smtp_load import make_body, new_event_loop

REPO = Path(__file__).resolve().parents[2]


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
            await expect(reader, 220, "greeting")
            marks["greeting"] = time.perf_counter()
            writer.write(b"EHLO good.bench\r\n")
            await expect(reader, 250, "EHLO")
            marks["ehlo"] = time.perf_counter()
            writer.write(
                f"MAIL FROM:<good@bench.test> SIZE={len(body)}\r\nRCPT TO:<{GOOD_USER}>\r\nDATA\r\n".encode()
            )
            for wanted, step in ((250, "MAIL"), (250, "RCPT"), (354, "DATA")):
                await expect(reader, wanted, step)
            marks["354"] = time.perf_counter()
            writer.write(body + b".\r\n")
            lines = await expect(reader, 250, "end of DATA")
            marks["250"] = time.perf_counter()
            text = lines[-1].decode("ascii", "replace")
            record["queue_id"] = text.rsplit(" ", 1)[-1] if "queued as" in text else None
            try:
                code, _ = await command(reader, writer, "QUIT")
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
                    for command_line in (None, f"USER {GOOD_USER}", f"PASS {PASSWORD}", "STAT"):
                        if command_line is not None:
                            writer.write(command_line.encode() + b"\r\n")
                        answer = await reader.readline()
                        if not answer.startswith(b"+OK"):
                            raise SMTPReplyError(f"{(command_line or 'greeting').split()[0]}: {answer[:80]!r}")
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


async def child_main(config: dict) -> None:
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


async def good_clients(phase) -> None:
    """
    Start the well-behaved clients' process, file its records as they
    come (L{bench.abuse.phase.Phase.file}), and stop it when the phase says so.
    """
    config = {"port": phase.port, "pop3_port": phase.pop3_port, "size": phase.args.size,
              "interval": phase.args.interval, "pop3_every": phase.args.pop3_every}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.abuse.well_behaved", json.dumps(config),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO,
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


if __name__ == "__main__":
    loop = new_event_loop()
    try:
        loop.run_until_complete(child_main(json.loads(sys.argv[1])))
    finally:
        loop.close()
