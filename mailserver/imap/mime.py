"""
A message's MIME structure, found in one pass over its lines: where each
part's header and body start and end, its content type, its line count,
and its header section's text, for BODYSTRUCTURE, ENVELOPE and
BODY[section] fetches.

Stored messages have LF line endings and are sent with CRLF, so every
offset is kept twice: as the client counts it (CRLF) and in the file (LF),
where a large message's section is read from.  The pass takes lines from
an iterator, so a 100 MB message is parsed a line at a time from its file
in a worker thread; only header sections are kept (each up to
L{MAX_HEADER}).

Multipart bodies are cut at their boundaries (RFC 2046 5.1.1: the CRLF
before a boundary belongs to the boundary), an enclosing part's boundary
also ends the parts inside it, and a C{message/rfc822} body is parsed as a
message of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The header section kept per part, in octets; past it the section is
# cut (its offsets stay exact).
MAX_HEADER = 256 * 1024
# Parts nested deeper than this are taken as opaque bodies.
MAX_DEPTH = 20
# Parts of one message beyond which the rest are not looked into.
MAX_PARTS = 2000

_TOKEN_END = re.compile(r'[\s;()<>@,:\\"/\[\]?=]')


class Part:
    """
    One part (the message itself is the outermost).  Offsets are CRLF
    offsets from the message's start; C{*_lf} the same points in the file.
    """

    __slots__ = (
        "start", "start_lf", "body_start", "body_start_lf", "body_end", "body_end_lf",
        "header", "body_lines", "children", "message", "type", "subtype", "params",
        "_fields", "_line_at_body", "digest",
    )

    def __init__(self, start: int, start_lf: int, digest: bool = False) -> None:
        self.start = start
        self.start_lf = start_lf
        self.body_start = self.body_start_lf = -1
        self.body_end = self.body_end_lf = -1
        self.header = b""
        self.body_lines = 0
        self.children: list[Part] = []
        self.message: Part | None = None
        self.digest = digest  # a child of multipart/digest: message/rfc822 by default
        self.type = self.subtype = ""
        self.params: list[tuple[str, str]] = []
        self._fields: list[tuple[str, bytes]] | None = None
        self._line_at_body = 0

    @property
    def header_size(self) -> int:
        return self.body_start - self.start

    @property
    def body_size(self) -> int:
        return self.body_end - self.body_start

    @property
    def is_multipart(self) -> bool:
        return self.type == "multipart"

    @property
    def is_message(self) -> bool:
        return self.type == "message" and self.subtype == "rfc822"

    def fields(self) -> list[tuple[str, bytes]]:
        """
        The header fields: (name lower-cased, value unfolded, without the
        line ends).
        """
        if self._fields is None:
            self._fields = header_fields(self.header)
        return self._fields

    def field(self, name: str) -> bytes | None:
        for key, value in self.fields():
            if key == name:
                return value
        return None

    def find(self, numbers: tuple[int, ...]) -> Part | None:
        """
        The part a section's numbers name (RFC 3501 6.4.5): in a
        non-multipart part, 1 is the part itself; through a
        message/rfc822 part the numbers go on in the enclosed message.
        A message that is itself message/rfc822 has that message as its
        part 1 (the first number does not go through it).
        """
        part = self
        for index, number in enumerate(numbers):
            if index and part.is_message and part.message is not None:
                part = part.message
            if part.is_multipart:
                if not 1 <= number <= len(part.children):
                    return None
                part = part.children[number - 1]
            elif number != 1:
                return None
        return part


def header_fields(header: bytes) -> list[tuple[str, bytes]]:
    fields: list[tuple[str, bytes]] = []
    for line in header.split(b"\n"):
        if not line.strip(b"\r"):
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name.strip():
            continue
        fields.append((name.strip().decode("ascii", "replace").lower(), value.strip()))
    return fields


def parse_content_type(value: bytes | None, digest: bool) -> tuple[str, str, list[tuple[str, str]]]:
    """
    (type, subtype, parameters) in lower case but for the parameters'
    values; the RFC 2045 default when the field is missing or broken.
    """
    default = ("message", "rfc822", []) if digest else ("text", "plain", [("charset", "us-ascii")])
    if value is None:
        return default
    text = value.decode("utf-8", "replace")
    kind, _, rest = text.partition(";")
    main, slash, sub = kind.strip().partition("/")
    main, sub = main.strip().lower(), sub.strip().lower()
    if not slash or not main or not sub or _TOKEN_END.search(main) or _TOKEN_END.search(sub):
        return default
    return main, sub, parameters(rest)


def parameters(text: str) -> list[tuple[str, str]]:
    """
    C{name=value} pairs after a C{;}, values unquoted (a C{Content-Type}'s
    or C{Content-Disposition}'s).
    """
    out: list[tuple[str, str]] = []
    position = 0
    length = len(text)
    while position < length:
        semicolon = _skip(text, position)
        equals = text.find("=", semicolon)
        if equals < 0:
            break
        name = text[semicolon:equals].strip().strip(";").strip().lower()
        position = equals + 1
        while position < length and text[position] in " \t":
            position += 1
        if position < length and text[position] == '"':
            value_chars = []
            position += 1
            while position < length and text[position] != '"':
                if text[position] == "\\" and position + 1 < length:
                    position += 1
                value_chars.append(text[position])
                position += 1
            value = "".join(value_chars)
            position += 1
        else:
            end = text.find(";", position)
            end = length if end < 0 else end
            value = text[position:end].strip()
            position = end
        semicolon = text.find(";", position)
        position = length if semicolon < 0 else semicolon + 1
        if name and _TOKEN_END.search(name.rstrip("*")) is None:
            out.append((name, value))
    return out


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t;":
        position += 1
    return position


def _boundary(part: Part) -> bytes | None:
    for name, value in part.params:
        if name == "boundary" and value:
            return b"--" + value.encode("utf-8", "replace")
    return None


class _Open:
    """
    A multipart part whose boundary is being looked for.
    """

    __slots__ = ("part", "boundary")

    def __init__(self, part: Part, boundary: bytes) -> None:
        self.part = part
        self.boundary = boundary


def parse(lines: Iterable[bytes]) -> Part:
    """
    The structure of a message given as LF lines (each with its LF, the
    last one maybe without).
    """
    root = Part(0, 0)
    parser = _Parser(root)
    for line in lines:
        parser.line(line)
    parser.end()
    return root


def parse_bytes(data: bytes) -> Part:
    return parse(data.splitlines(keepends=True))


class _Parser:
    def __init__(self, root: Part) -> None:
        self.crlf = 0
        self.lf = 0
        self.lines = 0
        self.parts = 1
        self.path: list[Part] = [root]  # root .. innermost open part
        self.in_header = True
        self.header: list[bytes] = []
        self.header_size = 0
        self.open: list[_Open] = []  # multiparts, outermost first
        self.last_blank = False  # the line before this one was empty

    def line(self, line: bytes) -> None:
        size_lf = len(line)
        size_crlf = size_lf + 1 if line[-1:] == b"\n" else size_lf
        if self.open and line[:2] == b"--" and self._boundary(line):
            self._advance(size_lf, size_crlf)
            self.last_blank = False
            return
        blank = not line.strip(b"\r\n")
        part = self.path[-1]
        if self.in_header:
            if blank:
                self._advance(size_lf, size_crlf)
                self.last_blank = True
                self._header_done(part)
                return
            if self.header_size < MAX_HEADER:
                self.header.append(line)
                self.header_size += size_lf
        self._advance(size_lf, size_crlf)
        self.last_blank = blank

    def _advance(self, size_lf: int, size_crlf: int) -> None:
        self.crlf += size_crlf
        self.lf += size_lf
        self.lines += 1

    def _boundary(self, line: bytes) -> bool:
        text = line.rstrip(b"\r\n").rstrip(b" \t")
        for index in range(len(self.open) - 1, -1, -1):
            context = self.open[index]
            boundary = context.boundary
            if not text.startswith(boundary):
                continue
            rest = text[len(boundary) :]
            if rest not in (b"", b"--"):
                continue
            self._close_inside(context.part)
            del self.open[index + 1 :]
            if rest == b"--":
                self.open.pop()
                self.in_header = False
                return True
            size_lf = len(line)
            size_crlf = size_lf + 1 if line[-1:] == b"\n" else size_lf
            if self.parts < MAX_PARTS:
                self.parts += 1
                child = Part(self.crlf + size_crlf, self.lf + size_lf, context.part.subtype == "digest")
                context.part.children.append(child)
                self.path.append(child)
                self.in_header = True
                self.header = []
                self.header_size = 0
            else:
                self.in_header = False
            return True
        return False

    def _close_inside(self, container: Part) -> None:
        """
        A boundary of C{container} ends every part opened inside it; the
        CRLF before the boundary is the boundary's, so an empty line just
        before it is no line of the part's (a part of 0 octets has 0 lines).
        """
        lines = self.lines - 1 if self.last_blank else self.lines
        while self.path[-1] is not container:
            part = self.path.pop()
            self._finish(part, self.crlf - 2, self.lf - 1, lines)
        self.in_header = False

    def _header_done(self, part: Part) -> None:
        part.header = b"".join(self.header)
        part.body_start, part.body_start_lf = self.crlf, self.lf
        part._line_at_body = self.lines
        self.in_header = False
        part.type, part.subtype, part.params = parse_content_type(
            part.field("content-type"), part.digest
        )
        depth = len(self.path)
        if part.is_multipart and depth < MAX_DEPTH:
            boundary = _boundary(part)
            if boundary is not None:
                self.open.append(_Open(part, boundary))
        elif part.is_message and depth < MAX_DEPTH and self.parts < MAX_PARTS:
            self.parts += 1
            part.message = Part(self.crlf, self.lf)
            self.path.append(part.message)
            self.in_header = True
            self.header = []
            self.header_size = 0

    def _finish(self, part: Part, end: int, end_lf: int, line: int) -> None:
        if part.body_start < 0:  # the header never ended: it was the innermost part
            part.header = b"".join(self.header)
            part.body_start, part.body_start_lf = max(end, part.start), max(end_lf, part.start_lf)
            part._line_at_body = line
            part.type, part.subtype, part.params = parse_content_type(
                part.field("content-type"), part.digest
            )
        part.body_end = max(end, part.body_start)
        part.body_end_lf = max(end_lf, part.body_start_lf)
        part.body_lines = max(0, line - part._line_at_body)
        if part.message is not None and part.message.body_end < 0:
            self._finish(part.message, end, end_lf, line)

    def end(self) -> None:
        while self.path:
            part = self.path.pop()
            self._finish(part, self.crlf, self.lf, self.lines)
