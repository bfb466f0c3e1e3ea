"""
The message text between DATA (or BDAT) and the final reply.

L{MessageSink} checks what arrives (line endings, size, line length, mail
loops) and streams it to the intake's receiver behind our C{Received:}
field, so a large message is never held in memory.  (DATA's end and its
dot-stuffing are L{mailserver.wire.dots.DotReader}'s.)
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime
from functools import lru_cache

from mailserver.safe_text import printable
from mailserver.smtp.replies import (
    BARE_NEWLINE,
    DATA_LINE_TOO_LONG,
    LOOP_DETECTED,
    TOO_BIG,
    Reply,
    storage_failure,
)
from mailserver.wire.long_lines import long_line_in

_RECEIVED = re.compile(rb"(?:^|\r\n)received[ \t]*:", re.IGNORECASE)
# Header sections longer than this are not scanned for Received: fields.
_MAX_HEADER_SCAN = 1024 * 1024
# A header field's start as Postfix's is_header() sees it: a name of
# printable ASCII other than the colon, spaces allowed before the colon
# (RFC 5322 4.5's obsolete syntax).
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def normalized(text: bytes) -> bytes:
    """
    Text with every line ended by CRLF: a bare LF ends a line and a bare
    CR becomes a space, as Postfix 3.9 takes them by default
    (C{smtpd_forbid_bare_newline = normalize} reads a bare LF as a line
    end; C{cleanup_replace_stray_cr_lf = yes} replaces a stray CR with a
    space).
    """
    return text.replace(b"\r\n", b"\n").replace(b"\r", b" ").replace(b"\n", b"\r\n")


def field_present(header: bytes, name: bytes) -> bool:
    """
    Has the header section (CRLF line ends) a field called C{name}?
    """
    pattern = re.compile(rb"(?:^|\r\n)" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE)
    return pattern.search(header) is not None


class MessageSink:
    """
    Checks the message text and forwards it to C{receiver}, behind our
    trace field.

    Pieces may be split anywhere.  The first problem found aborts the
    receiver and stops forwarding; the rest of the message is still read
    (the client is sending it anyway) and the problem is answered at the
    end, so the session stays in step.

    The message's start is held until its first line is complete, to tell
    whether it starts with a header field: if it does not (a first line
    that starts with a space would continue our C{Received:} field; a line
    that is no field ends the header section), an empty line goes after our
    fields, as Postfix puts one; a Unix mailbox's C{From } line becomes an
    C{X-Mailbox-Line:} field, as Postfix makes it.  Given C{missing_fields}, the whole header
    section is held (up to 1 MiB), and those fields the message lacks are
    added at its end.

    @param normalize: take a bare LF as a line end and a bare CR as a
        space (L{normalized}); otherwise refuse them.
    @param missing_fields: header fields (name, whole field with CRLF) to
        add when the message has none of that name (submission's C{Date:}
        and C{Message-ID:}, RFC 6409 8.2 and 8.3).
    """

    def __init__(
        self,
        receiver,
        trace_header: bytes,
        *,
        max_size: int,
        max_line: int,
        max_received: int,
        normalize: bool = True,
        missing_fields: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self._receiver = receiver
        self._trace_header = trace_header
        self._max_size = max_size
        self._max_line = max_line
        self._max_received = max_received
        self._normalize = normalize
        self._missing_fields = missing_fields
        self.size = 0
        self.problem: Reply | None = None
        self._held_cr = b""
        self._line_length = 0
        # The header section is scanned as it passes, keeping only its last
        # line (which may not have ended yet), after a CRLF that marks its
        # start; None once its end is found or it is too long to scan.
        self._header: bytes | None = b"\r\n"
        self._header_at = -2  # where _header starts in the message
        self._header_scanned = 0
        self._received = 0
        self._header_end: int | None = None  # where the empty line after the fields starts
        self._start: bytearray | None = bytearray()  # the start of the message, held

    def write(self, data: bytes) -> None:
        if self.problem is not None:
            return
        text = self._held_cr + data
        self._held_cr = b""
        if text.endswith(b"\r"):  # its LF may come in the next piece
            self._held_cr = b"\r"
            text = text[:-1]
        # Every CR is in a CRLF exactly when taking the CRs out and putting
        # one before each LF gives the text back: two replaces and a compare
        # in C, whose searches for one octet are memchr's (a fifth of the
        # time of counting the LFs, the CRs and the CRLFs).
        if text.replace(b"\r", b"").replace(b"\n", b"\r\n") != text:
            if not self._normalize:
                return self._refuse(BARE_NEWLINE)
            text = normalized(text)
        if self._too_long(text):
            return self._refuse(DATA_LINE_TOO_LONG)
        self.size += len(text)
        if self.size > self._max_size:
            return self._refuse(TOO_BIG)
        if self._header is not None:
            self._scan_header(text)
            if self.problem is not None:
                return
        start = self._start
        if start is not None:
            if start:
                start += text
                if not self._start_complete(text):
                    return
                text = bytes(start)
            elif not self._start_complete(text):
                start += text
                return
            self._start = None
            text = self._opening(text)
        if text:
            self._forward(text)

    def _start_complete(self, new: bytes) -> bool:
        """
        Is the held start complete with C{new}, its latest piece: its first
        line, or (to add missing fields) its header section as far as it is
        scanned?
        """
        if self._missing_fields:
            return self._header is None
        return b"\n" in new

    def _opening(self, start: bytes) -> bytes:
        """
        Our trace field, then the start of the message, with the empty
        line or the missing fields it needs.
        """
        newline = start.find(b"\n")
        first = start[: newline - 1] if newline > 0 else start
        trace = self._trace_header
        mailbox_line = b""
        if not start or not first:  # empty, or no header section at all
            return trace + self._added(b"") + start
        if first.lstrip(b">").startswith(b"From "):
            # A Unix mailbox's From_ line: a field of its own, as Postfix
            # makes it, and the message's header follows.
            mailbox_line = b"X-Mailbox-Line: "
        elif first[:1] in b" \t" or not _FIELD.match(first):
            # Not a header field: the header section is ours alone.
            return trace + self._added(b"") + b"\r\n" + start
        if not self._missing_fields:
            return trace + mailbox_line + start
        end = self._header_end
        if end is None or end > len(start):  # no end of the header in sight
            return trace + self._added(start) + mailbox_line + start
        return trace + mailbox_line + start[:end] + self._added(start[:end]) + start[end:]

    def _added(self, header: bytes) -> bytes:
        return b"".join(
            field for name, field in self._missing_fields if not field_present(header, name)
        )

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
            self._held_cr = b""
            if not self._normalize:
                self._refuse(BARE_NEWLINE)
            else:
                self.write(b" ")  # a stray CR at the very end
        if self._header is not None and self.problem is None:
            self._count_received(self._header)
        if self.problem is None and self._start is not None:
            start, self._start = bytes(self._start), None
            self._forward(self._opening(start))
        return self.problem

    def _too_long(self, text: bytes) -> bool:
        """
        RFC 5321 4.5.3.1.6: a text line is at most C{max_line} octets with
        its CRLF.  Lines may span pieces, so the open line's length carries.
        """
        last = text.rfind(b"\n")
        if last < 0:
            self._line_length += len(text)
            return self._line_length > self._max_line
        first = text.find(b"\n")
        too_long = self._line_length + first + 1 > self._max_line or long_line_in(
            text, self._max_line - 1, first + 1, last + 1
        )
        self._line_length = len(text) - last - 1
        return too_long or self._line_length > self._max_line

    def _scan_header(self, text: bytes) -> None:
        assert self._header is not None
        header = self._header + text
        end = header.find(b"\r\n\r\n")
        if end >= 0:
            self._header = None
            self._header_end = self._header_at + end + 2
            self._count_received(header[:end])
            return
        self._header_scanned += len(text)
        if self._header_scanned > _MAX_HEADER_SCAN:
            self._header = None
            return
        # Count the fields of the lines that have ended; keep the last line.
        last = header.rfind(b"\r\n")
        self._received += len(_RECEIVED.findall(header, 0, last))
        self._header = header[last:]
        self._header_at += last

    def _count_received(self, header: bytes) -> None:
        self._received += len(_RECEIVED.findall(header))
        if self._received > self._max_received:
            self._refuse(LOOP_DETECTED)

    def _refuse(self, problem: Reply) -> None:
        self.problem = problem
        self._start = None
        self._receiver.abort()


def received_header(
    *,
    helo: str,
    client_address: str,
    hostname: str,
    protocol: str,
    message_id: str,
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
    lines = [f"Received: from {_in_comment(helo)} ({literal})"]
    if tls:
        lines.append(f"\t({tls})")
    if authenticated:
        lines.append(f"\t(Authenticated sender: {_in_comment(authenticated)})")
    lines.append(f"\tby {hostname} (mailserver) with {protocol} id {message_id}")
    date = _date(int(when))
    if recipient:
        lines.append(f"\tfor <{printable(recipient)}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def completing_fields(message_id: str, hostname: str, when: float) -> tuple[tuple[bytes, bytes], ...]:
    """
    What submission adds to a message without them (RFC 6409 8.2, 8.3): a
    C{Date:} of its arrival and a C{Message-ID:} of its ID at our host.
    """
    return (
        (b"date", f"Date: {_date(int(when))}\r\n".encode()),
        (b"message-id", f"Message-ID: <{message_id}@{hostname}>\r\n".encode()),
    )


@lru_cache(maxsize=4)
def _date(second: int) -> str:
    """
    RFC 5322 date of a second; the same for every message within it.
    """
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def _in_comment(text: str) -> str:
    """
    Client text for a comment (or the word before one): printable, and no
    parenthesis to end it early.
    """
    return printable(text).replace("(", "?").replace(")", "?")


def with_protocol(*, esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """
    The C{with} keyword of the Received field (RFC 3848, RFC 6531 3.7.3).
    """
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix
