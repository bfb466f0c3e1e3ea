"""
The IMAP command grammar (RFC 3501 9, RFC 7888 literals): a command is a
tag, a name and arguments made of atoms, quoted strings, literals,
parenthesized lists and C{NIL}.

The glue hands L{parse} a command's pieces as they arrived: the text lines
and, after each line that ended with a literal's C{{n}} or C{{n+}}, that
literal's octets (L{Literal}).  Arguments come back as L{Atom}s (C{str}),
L{String}s (C{bytes}: quoted strings and small literals), L{Literal}s
(large ones, kept in a file) and lists of these.  An atom may hold a
bracketed part with spaces and parentheses, as FETCH's
C{BODY[HEADER.FIELDS (FROM TO)]<0.100>} does.

The helpers below turn arguments into values (astrings, mailbox names,
sequence sets, flags, dates) and raise L{ParseError} with the text of the
BAD response.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from typing import BinaryIO

from mailserver.mailbox_names import BadName, decode_utf7

# How deep parenthesized lists may nest (FETCH, SEARCH and ID need a few).
MAX_LIST_DEPTH = 64
_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}$")
# ATOM-CHAR (any CHAR but ( ) { SP CTL % * " \\ ]), with the list
# wildcards % and * and the ] of resp-specials, which atoms here may hold
# (LIST patterns, sequence sets); [ starts a bracketed part.
_PLAIN_ATOM = re.compile(rb'[^(){ "\\\x00-\x1f\x7f-\xff\[]*')


class ParseError(ValueError):
    """
    A command that does not parse; C{str()} is the BAD response's text,
    C{tag} the command's tag if it got that far.
    """

    def __init__(self, text: str, tag: str | None = None) -> None:
        super().__init__(text)
        self.tag = tag


class Atom(str):
    """
    An atom as the client wrote it.
    """


class String(bytes):
    """
    A quoted string's or a literal's octets.
    """


class NilType:
    def __repr__(self) -> str:
        return "NIL"


NIL = NilType()


@dataclass(eq=False)
class Literal:
    """
    A literal too large to keep in memory: its octets in a file.
    """

    file: BinaryIO
    size: int

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class LiteralSpec:
    size: int
    synchronizing: bool


def literal_at_end(line: bytes) -> LiteralSpec | None:
    """
    Does the line end with a literal's announcement (C{{12}} or C{{12+}})?
    """
    if not line.endswith(b"}"):
        return None
    match = _LITERAL_AT_END.search(line)
    if match is None:
        return None
    return LiteralSpec(int(match.group(1)), not match.group(2))


@dataclass(frozen=True)
class Command:
    """
    @ivar name: upper case; for a C{UID} command, C{"UID FETCH"} etc.
    """

    tag: str
    name: str
    args: tuple


class _Tokens:
    """
    Reads the pieces of one command: lines and the literals between them.
    """

    def __init__(self, pieces: list) -> None:
        self._pieces = pieces
        self._index = 0
        self._line = b""
        self._pos = 0
        self._depth = 0
        self._load()

    def _load(self) -> None:
        piece = self._pieces[self._index]
        line = bytes(piece)
        if self._index + 1 < len(self._pieces):
            match = _LITERAL_AT_END.search(line)
            line = line[: match.start()] if match else line
        self._line = line
        self._pos = 0

    def at_end(self) -> bool:
        return self._pos >= len(self._line) and self._index + 1 >= len(self._pieces)

    def peek(self) -> int | None:
        if self._pos < len(self._line):
            return self._line[self._pos]
        return None

    def expect_space(self) -> None:
        if self.peek() != 0x20:
            raise ParseError("Expected a space")
        self._pos += 1

    def value(self, in_list: bool = False):
        char = self.peek()
        if char is None:
            if self._index + 1 < len(self._pieces):
                self._index += 1
                literal = self._pieces[self._index]
                self._index += 1
                if self._index >= len(self._pieces):
                    raise ParseError("A literal must be followed by the rest of the command")
                self._load()
                return literal if isinstance(literal, Literal) else String(literal)
            raise ParseError("Missing argument")
        if char == 0x22:  # "
            return self._quoted()
        if char == 0x28:  # (
            return self._list()
        if char == 0x7B:  # { not at a line's end
            raise ParseError("Literal not at the end of a line")
        return self._atom()

    def _quoted(self) -> String:
        line = self._line
        position = self._pos + 1
        out = bytearray()
        while True:
            if position >= len(line):
                raise ParseError("Unterminated quoted string")
            char = line[position]
            if char == 0x22:
                break
            if char == 0x5C:
                position += 1
                if position >= len(line) or line[position] not in (0x22, 0x5C):
                    raise ParseError("Invalid escape in quoted string")
                char = line[position]
            elif char in (0x0A, 0x0D, 0x00):
                raise ParseError("Invalid character in quoted string")
            out.append(char)
            position += 1
        self._pos = position + 1
        return String(bytes(out))

    def _list(self) -> list:
        # Lists are read recursively: their depth is bounded so that a
        # line of 64 KiB of "(" is a BAD, not a RecursionError.
        if self._depth >= MAX_LIST_DEPTH:
            raise ParseError("Lists nested too deeply")
        self._depth += 1
        self._pos += 1
        items: list = []
        while True:
            char = self.peek()
            if char == 0x29:  # )
                self._pos += 1
                self._depth -= 1
                return items
            if items:
                if char != 0x20:
                    raise ParseError("Expected a space or ')' in a list")
                self._pos += 1
                if self.peek() == 0x29:
                    raise ParseError("Space before ')'")
            items.append(self.value(in_list=True))

    def _atom(self) -> Atom | NilType:
        line = self._line
        start = position = self._pos
        if line[position] == 0x5C:  # a flag: a backslash, then an atom or *
            position += 1
        # Atom characters are found by one regular expression; a bracketed
        # part (FETCH's BODY[...]) may hold spaces and lists, and after it
        # the atom goes on (<0.100>).
        while True:
            position = _PLAIN_ATOM.match(line, position).end()
            if position >= len(line) or line[position] != 0x5B:
                break
            depth = 0
            while position < len(line):
                char = line[position]
                if char == 0x5B:
                    depth += 1
                elif char == 0x5D:
                    depth -= 1
                    if depth == 0:
                        break
                elif char < 0x20 or char == 0x7F:
                    raise ParseError("Invalid character in an atom")
                position += 1
            else:
                raise ParseError("Missing ']'")
            position += 1
        if position < len(line) and line[position] >= 0x80:
            raise ParseError("8-bit character in an atom")
        if position == start:
            raise ParseError("Expected an atom")
        text = line[start:position].decode("ascii")
        self._pos = position
        if len(text) == 3 and text.upper() == "NIL":
            return NIL
        return Atom(text)


def parse(pieces: list) -> Command:
    """
    Parse a whole command: C{pieces} is its first line, then for each
    literal its octets and the line that followed.

    @raise ParseError: with the tag when it was read.
    """
    tokens = _Tokens(pieces)
    tag: str | None = None
    try:
        first = tokens.value()
        if not isinstance(first, Atom) or "+" in first or "[" in first or "*" in first or "%" in first:
            raise ParseError("Invalid tag")
        tag = str(first)
        tokens.expect_space()
        name = tokens.value()
        if not isinstance(name, Atom) or not name.isalpha():
            raise ParseError("Invalid command")
        name = name.upper()
        args: list = []
        if name == "UID":
            tokens.expect_space()
            sub = tokens.value()
            if not isinstance(sub, Atom):
                raise ParseError("Invalid UID command")
            name = f"UID {sub.upper()}"
        while not tokens.at_end():
            tokens.expect_space()
            args.append(tokens.value())
        return Command(tag, name, tuple(args))
    except ParseError as e:
        raise ParseError(str(e), tag) from None
    except IndexError:
        raise ParseError("Missing argument", tag) from None


def peek_tag_and_name(line: bytes) -> tuple[str, str]:
    """
    The tag and command name of a command's first line, for deciding how
    large its literal may be before it is parsed (upper case; C{""} if
    the line has none).
    """
    parts = line.split(b" ", 3)
    tag = parts[0].decode("ascii", "replace") if parts else ""
    name = parts[1].upper().decode("ascii", "replace") if len(parts) > 1 else ""
    if name == "UID" and len(parts) > 2:
        name = "UID " + parts[2].upper().decode("ascii", "replace")
    return tag, name


# Argument values.


def astring(value) -> bytes:
    if isinstance(value, String):
        return bytes(value)
    if isinstance(value, Atom):
        if "[" in value or "%" in value or "*" in value:
            raise ParseError("Invalid characters in an astring")
        return value.encode("ascii")
    if isinstance(value, Literal):
        raise ParseError("Literal too large here")
    raise ParseError("Expected a string")


def mailbox(value) -> str:
    """
    A mailbox name: modified UTF-7 decoded (RFC 3501 5.1.3).
    """
    raw = astring(value) if not isinstance(value, Atom) else value.encode("ascii")
    try:
        return decode_utf7(raw.decode("ascii"))
    except (UnicodeDecodeError, BadName):
        raise ParseError("Mailbox name is not valid modified UTF-7") from None


def list_pattern(value) -> str:
    """
    A LIST pattern (list-mailbox: wildcards allowed), decoded.
    """
    if isinstance(value, Atom):
        raw = value.encode("ascii")
    else:
        raw = astring(value)
    try:
        return decode_utf7(raw.decode("ascii"))
    except (UnicodeDecodeError, BadName):
        raise ParseError("Mailbox pattern is not valid modified UTF-7") from None


def atom(value) -> str:
    if not isinstance(value, Atom):
        raise ParseError("Expected an atom")
    return str(value)


def number(value, *, nonzero: bool = False) -> int:
    if not isinstance(value, Atom) or not value.isdigit() or len(value) > 10:
        raise ParseError("Expected a number")
    result = int(value)
    if result >= 2**32 or (nonzero and result == 0):
        raise ParseError("Number out of range")
    return result


def flag_list(value) -> list[str]:
    """
    A parenthesized list of flags (or a single flag, as STORE allows).
    """
    items = value if isinstance(value, list) else [value]
    flags = []
    for item in items:
        if not isinstance(item, Atom) or "[" in item or "]" in item:
            raise ParseError("Invalid flag")
        text = str(item)
        if text.startswith("\\") and not text[1:].isalpha():
            raise ParseError("Invalid flag")
        flags.append(text)
    return flags


_MONTHS = {name: n for n, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_DATE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_DATE_TIME = re.compile(
    r"^([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$"
)


def date(value) -> tuple[int, int, int]:
    """
    A SEARCH date (C{1-Feb-1994}) as (year, month, day).
    """
    text = astring(value).decode("ascii", "replace")
    match = _DATE.match(text)
    month = _MONTHS.get(match.group(2).capitalize()) if match else None
    if match is None or month is None:
        raise ParseError("Invalid date")
    day, year = int(match.group(1)), int(match.group(3))
    if not 1 <= day <= 31:
        raise ParseError("Invalid date")
    return year, month, day


def date_time(value) -> float:
    """
    APPEND's date-time (C{"17-Jul-1996 02:44:25 -0700"}) as a timestamp.
    """
    if not isinstance(value, String):
        raise ParseError("Invalid date-time")
    match = _DATE_TIME.match(bytes(value).decode("ascii", "replace"))
    month = _MONTHS.get(match.group(2).capitalize()) if match else None
    if match is None or month is None:
        raise ParseError("Invalid date-time")
    day, year = int(match.group(1)), int(match.group(3))
    hour, minute, second = (int(match.group(n)) for n in (4, 5, 6))
    if not (1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ParseError("Invalid date-time")
    offset = (int(match.group(8)) * 60 + int(match.group(9))) * 60
    if match.group(7) == "-":
        offset = -offset
    try:
        if day > calendar.monthrange(year, month)[1]:
            raise ValueError("no such day")
        moment = calendar.timegm((year, month, day, hour, minute, second)) - offset
    except (ValueError, OverflowError):
        raise ParseError("Invalid date-time") from None
    # INTERNALDATE gives it back in UTC with a 4-digit year (RFC 3501 9).
    if not _FIRST_MOMENT <= moment <= _LAST_MOMENT:
        raise ParseError("Invalid date-time")
    return moment


_FIRST_MOMENT = calendar.timegm((1, 1, 1, 0, 0, 0))
_LAST_MOMENT = calendar.timegm((9999, 12, 31, 23, 59, 59))


class SequenceSet:
    """
    A sequence set (C{1:4,7,9:*}); C{*} is the largest number in use.
    """

    def __init__(self, ranges: list[tuple[int | None, int | None]]) -> None:
        self.ranges = ranges

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """
        The ranges, low to high, with C{*} as C{largest}.
        """
        out = []
        for low, high in self.ranges:
            low = largest if low is None else low
            high = largest if high is None else high
            if low > high:
                low, high = high, low
            out.append((low, high))
        return out

    def contains(self, number: int, largest: int) -> bool:
        return any(low <= number <= high for low, high in self.resolve(largest))


def sequence_set(value) -> SequenceSet:
    if not isinstance(value, Atom):
        raise ParseError("Invalid sequence set")
    ranges: list[tuple[int | None, int | None]] = []
    for part in str(value).split(","):
        low, colon, high = part.partition(":")
        bounds = []
        for item in (low, high) if colon else (low,):
            if item == "*":
                bounds.append(None)
            elif item.isdigit() and len(item) <= 10 and 0 < int(item) < 2**32:
                bounds.append(int(item))
            else:
                raise ParseError("Invalid sequence set")
        ranges.append((bounds[0], bounds[-1]))
    return SequenceSet(ranges)
