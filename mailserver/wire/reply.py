"""
Replies as values (RFC 5321 4.2, with RFC 3463 enhanced status codes): the
one type the SMTP server answers with, plugins refuse with
(L{mailserver.hooks.Reject} is a checked L{Reply}) and the relay client
reads from the next hop.

Only the glue that owns a transport turns a reply into bytes, so a handler
can be tested without one and a reply is always well formed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# RFC 3463: class.subject.detail, at the start of a reply line.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """
    One SMTP reply.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 code (C{"2.1.0"}), written before every line
        (RFC 2034 4), or C{""} for replies that carry none (greeting, EHLO,
        HELO, 334 challenges, and a peer's reply whose lines do not all
        start with the same one).
    @ivar lines: the text, one item per line, without the codes.
    @ivar synthetic: made up here for a failure that had no reply (a
        refused connection, a timeout), not received from a peer.
    """

    code: int
    enhanced: str = ""
    lines: tuple[str, ...] = ("",)
    synthetic: bool = False

    @classmethod
    def received(cls, code: int, lines: Sequence[str]) -> Reply:
        """
        A peer's reply, from the text after C{"NNN-"} or C{"NNN "} of each
        line.  The enhanced code is taken out when every line starts with
        it, so that L{render} gives the peer's lines back exactly; an
        enhanced code whose class is not the reply's is text.
        """
        first = lines[0] if lines else ""
        match = _ENHANCED.match(first)
        if match is not None and match.group(1) == str(code)[0]:
            status = first[: match.end(3)]
            prefix = status + " "
            cut = len(prefix)
            if len(lines) == 1:  # most replies: no generators for one line
                if first.startswith(prefix):
                    return cls(code, status, (first[cut:],))
            elif all(line.startswith(prefix) for line in lines):
                return cls(code, status, tuple(line[cut:] for line in lines))
        return cls(code, "", tuple(lines))

    def render(self) -> bytes:
        """
        The wire form: one CRLF-terminated line per text line, C{250-} on
        every line but the last, the enhanced code repeated on each.
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
    def text(self) -> str:
        """
        The lines' text on one line, without the codes.
        """
        return " ".join(self.lines)

    @property
    def status(self) -> str:
        """
        The RFC 3463 status: the enhanced code, or one read from the first
        line of a peer's reply, or the reply code's class (C{"5.0.0"}).
        """
        if self.enhanced:
            return self.enhanced
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match is not None and match.group(1) == str(self.code)[0]:
            return ".".join(match.groups())
        return f"{str(self.code)[0]}.0.0"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def diagnostic(self) -> str:
        """
        The RFC 3464 C{Diagnostic-Code} value: C{"smtp; 550 5.1.1 text"}.
        """
        return f"smtp; {self}"

    def __str__(self) -> str:
        """
        The reply as the wire shows it, on one line: C{"550 5.1.1 text"}.
        """
        if self.enhanced:
            prefix = self.enhanced + " "
            text = " ".join(prefix + line for line in self.lines)
        else:
            text = " ".join(self.lines)
        return f"{self.code} {text}".strip()
