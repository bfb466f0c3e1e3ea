"""
IMAP benchmark tools: fetch whole mailboxes with several clients, and time
SELECT of a big folder.

 - L{run_imap_load}: one client per mailbox, each doing LOGIN, SELECT INBOX,
   UID SEARCH ALL, then C{UID FETCH <uid> BODY[]} of every message
   (pipelined: C{window} commands in flight, as mbsync does), LOGOUT.
   BODY[] sets \\Seen, as a client reading its mail does, so each round
   needs mailboxes of its own.
 - L{time_select}: on one mailbox, how long LOGIN, the first SELECT, a
   second SELECT, STATUS and C{UID FETCH 1:* (FLAGS)} take.

Mailboxes are filled with L{bench.pop3_load.fill_maildir} (our file names;
Dovecot reads them as they are).  Only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import resource
import time
from dataclasses import dataclass, field

from bench.smtp_load import run_async

_STREAM_LIMIT = 64 << 20
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class IMAPError(Exception):
    pass


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.tags = 0

    async def line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if not line.endswith(b"\n"):
            raise IMAPError("connection closed")
        return line

    async def response(self) -> tuple[bytes, list[bytes]]:
        """
        One response line with its literals: (the line's text, literals).
        """
        line = await self.line()
        literals = []
        while (match := _LITERAL.search(line)) is not None:
            data = await asyncio.wait_for(self.reader.readexactly(int(match.group(1))), self.timeout)
            literals.append(data)
            line = line[: match.start()] + b"{}" + await self.line()
        return line, literals

    def send(self, command: str) -> str:
        self.tags += 1
        tag = f"t{self.tags}"
        self.writer.write(f"{tag} {command}\r\n".encode())
        return tag

    async def until(self, tag: str, what: str) -> list[tuple[bytes, list[bytes]]]:
        seen = []
        while True:
            line, literals = await self.response()
            if line.startswith(tag.encode() + b" "):
                if not line.startswith(tag.encode() + b" OK"):
                    raise IMAPError(f"{what}: {line[:160]!r}")
                return seen
            seen.append((line, literals))

    async def command(self, command: str, what: str) -> list[tuple[bytes, list[bytes]]]:
        tag = self.send(command)
        await self.writer.drain()
        return await self.until(tag, what)


async def _connect(port: int, timeout: float) -> _Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=_STREAM_LIMIT)
    client = _Client(reader, writer, timeout)
    greeting = await client.line()
    if not greeting.startswith(b"* OK"):
        raise IMAPError(f"greeting: {greeting[:120]!r}")
    return client


async def _close(client: _Client) -> None:
    try:
        await client.command("LOGOUT", "LOGOUT")
    except (IMAPError, OSError, asyncio.TimeoutError):
        pass
    client.writer.close()


@dataclass
class IMAPResult:
    clients: int
    messages: int = 0
    octets: int = 0
    seconds: float = 0.0
    fetch_seconds: float = 0.0
    errors: int = 0
    size_mismatches: int = 0
    client_cpu_s: float = 0.0
    login_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def fetch_msgs_per_s(self) -> float:
        return self.messages / self.fetch_seconds if self.fetch_seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.octets / self.seconds / (1 << 20) if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"{self.messages} msgs in {self.seconds:.2f}s = {self.msgs_per_s:.0f} msgs/s "
            f"({self.fetch_msgs_per_s:.0f} after login), {self.mib_per_s:.1f} MiB/s, "
            f"errors {self.errors}"
        )


async def _fetch_mailbox(port, user, password, window, timeout, result, fetch_times, expected):
    started = time.perf_counter()
    client = await _connect(port, timeout)
    try:
        await client.command(f'LOGIN "{user}" "{password}"', "LOGIN")
        result.login_s.append(time.perf_counter() - started)
        fetching = time.perf_counter()
        await client.command("SELECT INBOX", "SELECT")
        found = await client.command("UID SEARCH ALL", "UID SEARCH")
        uids = [int(n) for line, _ in found if line.startswith(b"* SEARCH") for n in line.split()[2:]]
        pending: list[str] = []
        next_uid = 0
        while next_uid < len(uids) or pending:
            while next_uid < len(uids) and len(pending) < window:
                pending.append(client.send(f"UID FETCH {uids[next_uid]} BODY[]"))
                next_uid += 1
            await client.writer.drain()
            tag = pending.pop(0)
            for line, literals in await client.until(tag, "UID FETCH"):
                if b" FETCH " not in line or not literals:
                    continue
                body = literals[-1]
                result.messages += 1
                result.octets += len(body)
                if expected and len(body) not in expected:
                    result.size_mismatches += 1
        fetch_times.append(time.perf_counter() - fetching)
    finally:
        await _close(client)


def run_imap_load(
    port: int,
    users: list[str],
    password: str,
    window: int = 8,
    timeout: float = 120.0,
    expected_sizes: set[int] | None = None,
) -> IMAPResult:
    """
    Every user's INBOX fetched at once, one client each.
    """
    result = IMAPResult(clients=len(users))
    fetch_times: list[float] = []

    async def main():
        tasks = [
            _fetch_mailbox(port, u, password, window, timeout, result, fetch_times, expected_sizes)
            for u in users
        ]
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(outcome).__name__}: {outcome}"[:300])

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run_async(main())
    result.seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # The fetches ran side by side: the longest is the fetch part's time.
    result.fetch_seconds = max(fetch_times) if fetch_times else 0.0
    return result


def time_select(port: int, user: str, password: str, timeout: float = 600.0) -> dict:
    """
    Seconds for LOGIN, the first SELECT of INBOX, a second one, STATUS, a
    FETCH of every message's UID and flags, and SELECT and STATUS again
    three seconds later.
    """

    async def main():
        client = await _connect(port, timeout)
        out = {}
        try:
            t = time.perf_counter()
            await client.command(f'LOGIN "{user}" "{password}"', "LOGIN")
            out["login_s"] = time.perf_counter() - t
            for key in ("select_s", "select_again_s"):
                t = time.perf_counter()
                lines = await client.command("SELECT INBOX", "SELECT")
                out[key] = time.perf_counter() - t
                exists = [line for line, _ in lines if line.endswith(b" EXISTS\r\n")]
                out["exists"] = int(exists[0].split()[1]) if exists else 0
            t = time.perf_counter()
            await client.command("STATUS INBOX (MESSAGES UIDNEXT UNSEEN)", "STATUS")
            out["status_s"] = time.perf_counter() - t
            t = time.perf_counter()
            flags = await client.command("UID FETCH 1:* (FLAGS)", "UID FETCH")
            out["fetch_flags_s"] = time.perf_counter() - t
            out["fetched_flags"] = len(flags)
            # Later, when nothing has changed for a while (a client coming
            # back): ours trusts the folder's times then and lists nothing.
            await asyncio.sleep(3)
            for key, command in (("select_later_s", "SELECT INBOX"),
                                 ("status_later_s", "STATUS INBOX (MESSAGES UIDNEXT UNSEEN)")):
                t = time.perf_counter()
                await client.command(command, command.split()[0])
                out[key] = time.perf_counter() - t
        finally:
            await _close(client)
        return out

    return run_async(main())
