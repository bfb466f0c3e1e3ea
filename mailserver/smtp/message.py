"""
The message text between DATA (or BDAT) and the final reply.

L{MessageSink} checks what arrives (size, line length, bare CR or LF, mail
loops) and streams it to the intake's receiver behind our C{Received:}
header, so a large message is never held in memory.  (DATA's end and its
dot-stuffing are L{mailserver.wire.dots.DotReader}'s.)
"""

from __future__ import annotations

import re
from itertools import repeat
from datetime import datetime, timezone
from email.utils import format_datetime
from functools import lru_cache

from mailserver.smtp.replies import (
    BARE_NEWLINE,
    DATA_LINE_TOO_LONG,
    LOOP_DETECTED,
    TOO_BIG,
    Reply,
    storage_failure,
)

_RECEIVED = re.compile(rb"(?:^|\r\n)received[ \t]*:", re.IGNORECASE)
# Header sections longer than this are not scanned for Received: fields.
_MAX_HEADER_SCAN = 1024 * 1024


class MessageSink:
    """
    Checks the message text and forwards it to C{receiver}.

    Pieces may be split anywhere.  The first problem found aborts the
    receiver and stops forwarding; the rest of the message is still read
    (the client is sending it anyway) and the problem is answered at the
    end, so the session stays in step.
    """

    def __init__(
        self,
        receiver,
        trace_header: bytes,
        *,
        max_size: int,
        max_line: int,
        max_received: int,
    ) -> None:
        self._receiver = receiver
        self._trace_header = trace_header
        self._max_size = max_size
        self._max_line = max_line
        self._max_received = max_received
        self.size = 0
        self.problem: Reply | None = None
        self._held_cr = b""
        self._line_length = 0
        self._header: bytearray | None = bytearray(b"\r\n")

    def write(self, data: bytes) -> None:
        if self.problem is not None:
            return
        text = self._held_cr + data
        self._held_cr = b""
        if text.endswith(b"\r"):  # its LF may come in the next piece
            self._held_cr = b"\r"
            text = text[:-1]
        lines = text.split(b"\n")
        # Every LF has a CR before it, and there are as many CRs as LFs:
        # then every CR is in a CRLF too.
        if text.count(b"\r") != len(lines) - 1 or not all(
            map(bytes.endswith, lines[:-1], repeat(b"\r"))
        ):
            return self._refuse(BARE_NEWLINE)
        if self._too_long(lines):
            return self._refuse(DATA_LINE_TOO_LONG)
        self.size += len(text)
        if self.size > self._max_size:
            return self._refuse(TOO_BIG)
        if self._header is not None:
            self._scan_header(text)
            if self.problem is not None:
                return
        if self._trace_header:
            text = self._trace_header + text
            self._trace_header = b""
        if text:
            self._forward(text)

    def _forward(self, text: bytes) -> None:
        """
        A large message is written to disk as it arrives, so a full or
        unwritable disk shows here first: the message is refused, the
        session goes on.
        """
        try:
            self._receiver.write(text)
        except OSError as e:
            self._refuse(storage_failure(e))

    def close(self) -> Reply | None:
        """
        The client finished sending; return the problem, if any.
        """
        if self._held_cr and self.problem is None:
            self._refuse(BARE_NEWLINE)
        if self._header is not None and self.problem is None:
            self._count_received(bytes(self._header))
        if self.problem is None and self._trace_header:
            self._forward(self._trace_header)  # an empty message
        return self.problem

    def _too_long(self, lines: list[bytes]) -> bool:
        """
        RFC 5321 4.5.3.1.6: a text line is at most C{max_line} octets with
        its CRLF.  Lines may span pieces, so the open line's length carries.

        @param lines: the piece split at each LF.
        """
        if len(lines) == 1:
            self._line_length += len(lines[0])
            return self._line_length > self._max_line
        longest = max(self._line_length + len(lines[0]), max(map(len, lines[1:-1]), default=0))
        self._line_length = len(lines[-1])
        return longest + 1 > self._max_line or self._line_length > self._max_line

    def _scan_header(self, text: bytes) -> None:
        header = self._header
        assert header is not None
        # Search only what is new (and the 3 octets before it), so a header
        # sent in many small pieces costs linear time, not quadratic.
        start = max(0, len(header) - 3)
        header += text
        end = header.find(b"\r\n\r\n", start)
        if end >= 0:
            self._header = None
            self._count_received(bytes(header[:end]))
        elif len(header) > _MAX_HEADER_SCAN:
            self._header = None

    def _count_received(self, header: bytes) -> None:
        if len(_RECEIVED.findall(header)) > self._max_received:
            self._refuse(LOOP_DETECTED)

    def _refuse(self, problem: Reply) -> None:
        self.problem = problem
        self._receiver.abort()


def received_header(
    *,
    helo: str,
    client_address: str,
    hostname: str,
    protocol: str,
    session_id: str,
    tls: str | None,
    authenticated: str | None,
    recipient: str | None,
    when: float,
) -> bytes:
    """
    The RFC 5321 4.4 trace field, in Postfix's layout.  No DNS lookups: the
    client is named by its address literal.
    """
    literal = f"[IPv6:{client_address}]" if ":" in client_address else f"[{client_address}]"
    lines = [f"Received: from {_printable(helo)} ({literal})"]
    if tls:
        lines.append(f"\t({tls})")
    if authenticated:
        lines.append(f"\t(Authenticated sender: {_printable(authenticated)})")
    lines.append(f"\tby {hostname} (mailserver) with {protocol} id {session_id}")
    date = _date(int(when))
    if recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@lru_cache(maxsize=4)
def _date(second: int) -> str:
    """
    RFC 5322 date of a second; the same for every message within it.
    """
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text)


def with_protocol(*, esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """
    The C{with} keyword of the Received field (RFC 3848, RFC 6531 3.7.3).
    """
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix
