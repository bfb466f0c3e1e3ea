"""
The benchmarks' SMTP client steps, over asyncio streams: connect and greet,
send a command, read a reply.  Every bench file that talks SMTP line by line
uses these (L{bench.smtp_load}'s fast path has a protocol of its own).
"""

from __future__ import annotations

import asyncio


class SMTPReplyError(Exception):
    """
    A reply that did not come, did not parse, or was not the one wanted
    (then C{step} names the step and C{code}, C{lines} are the reply).
    """

    def __init__(self, text: str, step: str = "", code: int | None = None, lines=()) -> None:
        super().__init__(text)
        self.step = step
        self.code = code
        self.lines = list(lines)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """
    One (possibly multi-line) SMTP reply: its code and its text lines.
    """
    lines = []
    for _ in range(1000):  # bounded: no reply has that many lines
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
    """
    A reply in short: its code and last line.
    """
    return f"{code} {lines[-1].decode('ascii', 'replace') if lines else ''}"[:90]


def check(code: int, lines: list[bytes], wanted: int, step: str) -> list[bytes]:
    if code != wanted:
        raise SMTPReplyError(f"{step}: {reply_text(code, lines)}", step, code, lines)
    return lines


async def expect(reader: asyncio.StreamReader, wanted: int, step: str) -> list[bytes]:
    """
    Read a reply; its lines if its code is C{wanted}, else L{SMTPReplyError}.
    """
    return check(*(await read_reply(reader)), wanted, step)


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str | bytes
) -> tuple[int, list[bytes]]:
    """
    Send one command line (CRLF added) and read its reply.
    """
    writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
    return await read_reply(reader)


async def greet(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: str | None = None
) -> list[bytes]:
    """
    Expect the 220 greeting and, given a name, say EHLO and expect 250;
    return the EHLO reply's lines (empty without).
    """
    await expect(reader, 220, "greeting")
    if ehlo is None:
        return []
    return check(*(await command(reader, writer, f"EHLO {ehlo}")), 250, "EHLO")


async def connect(
    host: str, port: int, *, ehlo: str | None = None, **options
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    Connect and L{greet}; C{options} go to L{asyncio.open_connection}
    (C{limit}, C{local_addr}).
    """
    reader, writer = await asyncio.open_connection(host, port, **options)
    try:
        await greet(reader, writer, ehlo)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def close(writer: asyncio.StreamWriter, reset: bool = False) -> None:
    """
    Close (with an RST if C{reset}), waiting a little for the close to
    finish.
    """
    if reset:
        writer.transport.abort()
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (OSError, TimeoutError):
        pass
