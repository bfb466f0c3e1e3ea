"""
SEARCH (RFC 3501 6.4.4): the keys of L{mailserver.imap.arguments.search_keys}
tested against one message.

Keys on flags, numbers, sizes and dates need only what the folder knows
and are tested on the reactor thread; keys on header fields or text need
the message, and a batch of messages is then tested in a worker thread
(L{matching}).  Strings match case-insensitively as substrings, header
fields after their RFC 2047 encoded words are decoded; body text is
matched as stored (a base64 or quoted-printable body is not decoded).
"""

from __future__ import annotations

import email.header
import email.utils
import time
from typing import BinaryIO

from mailserver.imap.mime import header_fields

_CHUNK = 256 * 1024
_OVERLAP = 1024


def needs_message(keys) -> bool:
    return any(_needs(key) for key in keys)


def _needs(key) -> bool:
    kind = key[0]
    if kind in ("HEADER", "BODY", "TEXT"):
        return True
    if kind == "DATE":
        return key[1].startswith("SENT")
    if kind == "NOT":
        return _needs(key[1])
    if kind == "OR":
        return _needs(key[1]) or _needs(key[2])
    if kind == "AND":
        return needs_message(key[1])
    return False


def needs_description(keys) -> bool:
    """
    Do the keys need sizes or dates the folder may not know yet?
    """
    return any(_needs_description(key) for key in keys)


def _needs_description(key) -> bool:
    kind = key[0]
    if kind == "DATE":
        return True
    if kind in ("LARGER", "SMALLER"):
        return True
    if kind == "NOT":
        return _needs_description(key[1])
    if kind == "OR":
        return _needs_description(key[1]) or _needs_description(key[2])
    if kind == "AND":
        return needs_description(key[1])
    return False


class Candidate:
    """
    One message as SEARCH sees it.

    @ivar content: the stored bytes (LF), an open file of them, or
        C{None} when no key needs them.
    """

    __slots__ = ("seq", "uid", "flags", "recent", "size", "internaldate", "content", "_fields", "largest")

    def __init__(self, seq, uid, flags, recent, size, internaldate, largest) -> None:
        self.seq = seq
        self.uid = uid
        self.flags = {flag.lower() for flag in flags}
        self.recent = recent
        self.size = size
        self.internaldate = internaldate
        self.largest = largest  # (last sequence number, last UID), for "*"
        self.content: bytes | BinaryIO | None = None
        self._fields: list[tuple[str, bytes]] | None = None

    def fields(self) -> list[tuple[str, bytes]]:
        if self._fields is None:
            self._fields = header_fields(_header(self.content))
        return self._fields


def _header(content) -> bytes:
    if content is None:
        return b""
    if isinstance(content, (bytes, bytearray)):
        end = content.find(b"\n\n")
        return bytes(content if end < 0 else content[: end + 1])
    content.seek(0)
    lines = []
    for line in content:
        if line in (b"\n", b"\r\n"):
            break
        lines.append(line)
    return b"".join(lines)


def _decoded(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def _contains(content, needle: str, body_only: bool) -> bool:
    wanted = needle.casefold().encode("utf-8")
    if not wanted:
        return True
    if content is None:
        return False
    if isinstance(content, (bytes, bytearray)):
        data = bytes(content)
        if body_only:
            end = data.find(b"\n\n")
            data = data[end + 2 :] if end >= 0 else b""
        return wanted in data.lower()
    content.seek(0)
    if body_only:
        for line in content:
            if line in (b"\n", b"\r\n"):
                break
    tail = b""
    while chunk := content.read(_CHUNK):
        data = (tail + chunk).lower()
        if wanted in data:
            return True
        tail = data[-_OVERLAP:]
    return False


def _day(timestamp: float) -> tuple[int, int, int]:
    moment = time.gmtime(timestamp)
    return moment.tm_year, moment.tm_mon, moment.tm_mday


def _sent_day(candidate: Candidate) -> tuple[int, int, int] | None:
    for name, value in candidate.fields():
        if name == "date":
            parsed = email.utils.parsedate_tz(value.decode("ascii", "replace"))
            if parsed is None:
                return None
            return parsed[0], parsed[1], parsed[2]
    return None


def matches(key, candidate: Candidate) -> bool:
    kind = key[0]
    if kind == "ALL":
        return True
    if kind == "FLAG":
        return (key[1].lower() in candidate.flags) == key[2]
    if kind == "SEQ":
        return key[1].contains(candidate.seq, candidate.largest[0])
    if kind == "UID":
        return key[1].contains(candidate.uid, candidate.largest[1])
    if kind == "RECENT":
        return candidate.recent == key[1]
    if kind == "NEW":
        return candidate.recent and "\\seen" not in candidate.flags
    if kind == "LARGER":
        return candidate.size > key[1]
    if kind == "SMALLER":
        return candidate.size < key[1]
    if kind == "NOT":
        return not matches(key[1], candidate)
    if kind == "OR":
        return matches(key[1], candidate) or matches(key[2], candidate)
    if kind == "AND":
        return all(matches(inner, candidate) for inner in key[1])
    if kind == "DATE":
        which = key[1]
        day = _sent_day(candidate) if which.startswith("SENT") else _day(candidate.internaldate)
        if day is None:
            return False
        wanted = key[2]
        if which.endswith("BEFORE"):
            return day < wanted
        if which.endswith("SINCE"):
            return day >= wanted
        return day == wanted
    if kind == "HEADER":
        name, needle = key[1].lower(), key[2].casefold()
        for field, value in candidate.fields():
            if field == name and (not needle or needle in _decoded(value).casefold()):
                return True
        return False
    if kind == "BODY":
        return _contains(candidate.content, key[1], body_only=True)
    if kind == "TEXT":
        return _contains(candidate.content, key[1], body_only=False)
    raise ValueError(kind)


def matching(candidates: list[Candidate], keys) -> list[Candidate]:
    """
    The candidates every key matches (in a worker thread when keys read
    the messages); files are closed.
    """
    try:
        return [c for c in candidates if all(matches(key, c) for key in keys)]
    finally:
        for candidate in candidates:
            content = candidate.content
            if content is not None and not isinstance(content, (bytes, bytearray)):
                content.close()
            candidate.content = None
