"""
POP3 responses as values (RFC 1939 3, with RFC 2449 response codes and
RFC 5034 SASL challenges), and the ones the session gives by name.

A handler returns a L{Response}; only the glue turns it into bytes, with
L{Response.render}, so every response is well formed.  POP3's status
responses are not SMTP's coded replies (L{mailserver.wire.reply.Reply}),
hence a type of their own.
"""

from __future__ import annotations

from base64 import b64encode
from typing import NamedTuple

OK = "+OK"
ERR = "-ERR"
CHALLENGE = "+"


class Response(NamedTuple):
    """
    One response: an immutable value (a named tuple, the cheapest to make
    of those; one is made per RETR).

    @ivar status: L{OK}, L{ERR} or L{CHALLENGE} (a SASL challenge, whose
        text is base64).
    @ivar text: what follows the status on its line.
    @ivar code: an RFC 2449 response code (C{"SYS/TEMP"}), written in
        brackets before the text, or C{""}.
    @ivar lines: a multi-line response's lines (dot-stuffed when rendered,
        then the terminating C{.}), or C{None} for a single line.
    """

    status: str
    text: str = ""
    code: str = ""
    lines: tuple[str, ...] | None = None

    def render(self) -> bytes:
        text = f"[{self.code}] {self.text}" if self.code else self.text
        first = f"{self.status} {text}" if text or self.status == CHALLENGE else self.status
        if self.lines is None:
            return first.encode("utf-8") + b"\r\n"
        if not self.lines:
            return first.encode("utf-8") + b"\r\n.\r\n"
        body = "\r\n".join(self.lines).encode("utf-8")
        if body[:1] == b"." or b"\r\n." in body:  # rare: one search, not a test per line
            body = (b"." if body[:1] == b"." else b"") + body.replace(b"\r\n.", b"\r\n..")
        return b"".join((first.encode("utf-8"), b"\r\n", body, b"\r\n.\r\n"))

    @property
    def positive(self) -> bool:
        return self.status != ERR


def ok(text: str = "", code: str = "", lines: tuple[str, ...] | None = None) -> Response:
    return Response(OK, text, code, lines)


def err(text: str, code: str = "") -> Response:
    return Response(ERR, text, code)


def challenge(data: bytes) -> Response:
    return Response(CHALLENGE, b64encode(data).decode("ascii"))


OKAY = ok()
UNKNOWN_COMMAND = err("Unknown command.")
LINE_TOO_LONG = err("Line too long.")
TOO_MANY_ERRORS = err("Too many invalid commands.")
TIMEOUT = err("Disconnected for inactivity.")
# Dovecot's wording, which clients and admins already know (RFC 2595 2).
PLAINTEXT_REFUSED = err(
    "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.", "AUTH"
)
# A connection over the caps (mailserver.connection_limits), refused at the greeting.
CLIENT_FULL = err("Too many connections from your address, try again later.", "SYS/TEMP")
LISTENER_FULL = err("Too many connections, try again later.", "SYS/TEMP")
SERVER_BUSY = err("Server too busy, try again later.", "SYS/TEMP")
LOGINS_REFUSED = err("Too many failed logins from your address, try again later.", "SYS/TEMP")
AUTH_FAILED = err("Authentication failed.", "AUTH")
AUTH_UNAVAILABLE = err("Temporary authentication failure.", "SYS/TEMP")
MAILBOX_IN_USE = err("Mailbox is locked by another POP3 session.", "IN-USE")
MAILBOX_BROKEN = err("Mailbox is temporarily unavailable.", "SYS/TEMP")
NO_MAILBOX = err("Mailbox is unavailable.", "SYS/PERM")
UNREADABLE = err("The message cannot be read now.", "SYS/TEMP")
REMOVED = err("The message was removed by another client.")
NOT_REMOVED = err("Some deleted messages could not be removed.", "SYS/TEMP")
