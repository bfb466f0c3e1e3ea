"""
SMTP replies as values (RFC 5321 4.2, with RFC 3463 enhanced status codes).

Handlers return a L{Reply}; only the protocol turns it into bytes, so a
handler can be tested without a transport and a reply is always well formed.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """
    One SMTP reply.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 code (C{"2.1.0"}) or C{""} for replies that
        carry none (greeting, EHLO, HELO, 334 challenges).
    @ivar lines: the text, one item per line; rendered with C{250-} on every
        line but the last.
    """

    code: int
    enhanced: str
    lines: tuple[str, ...]

    def render(self) -> bytes:
        """
        The wire form: one CRLF-terminated line per text line, the enhanced
        code repeated on each (RFC 2034 section 4).
        """
        prefix = f"{self.enhanced} " if self.enhanced else ""
        lines = self.lines
        if len(lines) <= 1:
            return f"{self.code} {prefix}{lines[0] if lines else ''}\r\n".encode("utf-8")
        last = len(lines) - 1
        return "".join(
            f"{self.code}{' ' if number == last else '-'}{prefix}{line}\r\n"
            for number, line in enumerate(lines)
        ).encode("utf-8")

    @property
    def is_error(self) -> bool:
        return self.code >= 400


def reply(code: int, enhanced: str, *lines: str) -> Reply:
    return Reply(code, enhanced, lines)


OK = reply(250, "2.0.0", "Ok")
BAD_SEQUENCE = reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = reply(500, "5.5.2", "Error: line too long")
BAD_BYTES = reply(500, "5.5.2", "Error: command contains invalid characters")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")
TEMPORARY_FAILURE = reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = reply(452, "4.3.1", "Error: insufficient system storage")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
TOO_BIG = reply(552, "5.3.4", "Error: message file too big")
BARE_NEWLINE = reply(550, "5.5.2", "Error: bare <CR> or <LF> received")
DATA_LINE_TOO_LONG = reply(500, "5.5.2", "Error: message line too long")
LOOP_DETECTED = reply(554, "5.4.6", "Error: too many hops (mail loop detected)")
RELAY_DENIED = reply(554, "5.7.1", "Relay access denied")
USER_UNKNOWN = reply(550, "5.1.1", "Recipient address rejected: User unknown")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
SMTPUTF8_REQUIRED = reply(553, "5.6.7", "Error: SMTPUTF8 is required for this address")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_failure(error: BaseException) -> Reply:
    """
    What to tell a client whose message could not be stored: a full disk or
    quota is 452 4.3.1 (RFC 3463 "mail system full"), anything else (an
    unwritable or read-only data folder, an I/O error) 451 4.3.0.  Both are
    temporary: the client keeps the message and tries again.
    """
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return INSUFFICIENT_STORAGE
    return TEMPORARY_FAILURE
