"""
IMAP responses as values (RFC 3501 7): tagged status responses, untagged
data, continuation requests; and the encoding of strings, mailbox names
and flag lists in them.  Only the glue turns them into bytes on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mailserver.mailbox_names import encode_utf7


@dataclass(frozen=True, slots=True)
class Tagged:
    """
    The end of a command: C{tag OK|NO|BAD [code] text}.
    """

    tag: str
    status: str
    text: str
    code: str = ""

    def render(self) -> bytes:
        code = f"[{self.code}] " if self.code else ""
        return f"{self.tag} {self.status} {code}{self.text}\r\n".encode("utf-8")

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass(frozen=True, slots=True)
class Untagged:
    """
    C{* <data>}: C{data} is the response after the C{* }, without CRLF
    (it may hold literals, with their own CRLFs).
    """

    data: bytes

    def render(self) -> bytes:
        return b"* " + self.data + b"\r\n"


@dataclass(frozen=True, slots=True)
class Continuation:
    text: str

    def render(self) -> bytes:
        return f"+ {self.text}\r\n".encode("utf-8")


def ok(tag: str, text: str, code: str = "") -> Tagged:
    return Tagged(tag, "OK", text, code)


def no(tag: str, text: str, code: str = "") -> Tagged:
    return Tagged(tag, "NO", text, code)


def bad(tag: str, text: str, code: str = "") -> Tagged:
    return Tagged(tag, "BAD", text, code)


def untagged(text: str) -> Untagged:
    return Untagged(text.encode("utf-8"))


# Strings in responses.

_QUOTABLE = frozenset(range(0x20, 0x7F))


def string(value: bytes | str) -> bytes:
    """
    A string: quoted when it is short printable ASCII, else a literal (a
    NUL, which a literal cannot hold, as 0x80).
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(value) < 1024 and all(c in _QUOTABLE for c in value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value.replace(b"\x00", b"\x80")


def nstring(value: bytes | str | None) -> bytes:
    return b"NIL" if value is None else string(value)


def mailbox(name: str) -> bytes:
    """
    A mailbox name in a response: modified UTF-7, quoted.
    """
    return string(encode_utf7(name))


def flag_list(flags: Iterable[str]) -> bytes:
    return ("(" + " ".join(flags) + ")").encode("utf-8")
