"""
FETCH responses (RFC 3501 7.4.2) for one message, from what is known of
it: flags, size and date, its parsed structure, and its text.

A small message's text is at hand as one CRLF string and sections are cut
from it; a large one's are L{Stream}s, pieces of its file the glue sends
as the transport takes them, so its text is never held whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from mailserver.imap.arguments import BodyItem, Section
from mailserver.imap.mime import Part
from mailserver.imap.responses import flag_list
from mailserver.imap.structure import body_structure, envelope

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
STRUCTURE_ITEMS = frozenset({"ENVELOPE", "BODY", "BODYSTRUCTURE"})
# A section of a message held in memory at least this large is its own
# piece of the response (a view of the message, not a copy), sent as the
# client reads: one FETCH may name BODY[] hundreds of times.
SEPARATE = 16 * 1024


@dataclass(frozen=True, slots=True)
class Stream:
    """
    A literal's octets to send from the message's file: from the LF
    offset C{start_lf}, the CRLF form, after skipping C{skip} octets of
    it, C{length} octets.
    """

    start_lf: int
    skip: int
    length: int


@dataclass(slots=True)
class Message:
    """
    What the fetch of one message has to go on.

    @ivar wire: the whole message in CRLF form, if it is small.
    @ivar structure: its parsed structure, if an item needs it.
    """

    seq: int
    uid: int
    flags: list[str]
    size: int
    internaldate: float
    structure: Part | None = None
    wire: bytes | None = None


def quick(items) -> bool:
    """
    Only UID and FLAGS (what a client asks of every message to resync):
    answered by L{render_quick}.
    """
    return all(item == "UID" or item == "FLAGS" for item in items)


def render_quick(seq: int, uid: int, items, flags: bytes) -> bytes:
    """
    The FETCH response of L{quick} items, C{flags} being the message's
    flag list as the response writes it.
    """
    values = [b"UID %d" % uid if item == "UID" else b"FLAGS " + flags for item in items]
    return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(values))


def needs_text(items) -> bool:
    return any(isinstance(item, BodyItem) for item in items)


def needs_structure(items) -> bool:
    for item in items:
        if item in STRUCTURE_ITEMS:
            return True
        if isinstance(item, BodyItem) and (item.section.part or item.section.kind):
            return True
    return False


# INTERNALDATE's years have 4 digits (RFC 3501 9): a file time another
# program set outside them is given as the nearest one that has.
_FIRST_MOMENT = -62135596800  # 1-Jan-0001 00:00:00 UTC
_LAST_MOMENT = 253402300799  # 31-Dec-9999 23:59:59 UTC


def internal_date(timestamp: float) -> str:
    moment = time.gmtime(min(max(timestamp, _FIRST_MOMENT), _LAST_MOMENT))
    return (
        f"{moment.tm_mday:2d}-{_MONTHS[moment.tm_mon - 1]}-{moment.tm_year:04d} "
        f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d} +0000"
    )


def render(message: Message, items) -> Iterator[bytes | memoryview | Stream]:
    """
    The untagged FETCH response: bytes, with L{Stream}s where a large
    message's text goes and large sections of a small one on their own
    (L{SEPARATE}), each made only when the one before is sent.
    """
    pieces = [b"* %d FETCH (" % message.seq]
    held = 0
    for number, item in enumerate(items):
        if number:
            pieces.append(b" ")
        if not isinstance(item, BodyItem):
            pieces.append(_simple(message, item))
            continue
        value = _body(message, item)
        name = item.name.encode("ascii")
        if isinstance(value, Stream) or len(value) >= SEPARATE:
            pieces.append(name + b" {%d}\r\n" % (value.length if isinstance(value, Stream) else len(value)))
            yield b"".join(pieces)
            yield value
            pieces = []
        else:
            pieces.append(name + b" {%d}\r\n" % len(value) + value)
            held += len(pieces[-1])
            if held >= SEPARATE:  # many small sections add up
                yield b"".join(pieces)
                pieces, held = [], 0
    pieces.append(b")\r\n")
    yield b"".join(pieces)


def _simple(message: Message, item: str) -> bytes:
    if item == "UID":
        return b"UID %d" % message.uid
    if item == "FLAGS":
        return b"FLAGS " + flag_list(message.flags)
    if item == "RFC822.SIZE":
        size = message.structure.body_end if message.structure is not None else message.size
        return b"RFC822.SIZE %d" % max(size, 0)
    if item == "INTERNALDATE":
        return b'INTERNALDATE "' + internal_date(message.internaldate).encode("ascii") + b'"'
    structure = message.structure
    assert structure is not None
    if item == "ENVELOPE":
        return b"ENVELOPE " + envelope(structure)
    if item == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + body_structure(structure)
    if item == "BODY":
        return b"BODY " + body_structure(structure, extensible=False)
    raise ValueError(item)


def _body(message: Message, item: BodyItem) -> bytes | memoryview | Stream:
    section = item.section
    structure = message.structure
    if section.kind.startswith("HEADER.FIELDS"):
        part = _header_part(structure, section)
        data = b"" if part is None else header_fields(part.header, section)
        return _partial(data, item.partial)
    if structure is None:  # BODY[] or RFC822, no structure needed
        start, end, start_lf = 0, message.size, 0
    else:
        found = _range(structure, section)
        if found is None:
            return b""
        start, end, start_lf = found
    length = max(0, end - start)
    skip = 0
    if item.partial is not None:
        first, most = item.partial
        skip = min(first, length)
        length = max(0, min(most, length - skip))
    if message.wire is not None:
        return memoryview(message.wire)[start + skip : start + skip + length]
    return Stream(start_lf, skip, length)


def _partial(data: bytes, partial) -> bytes:
    if partial is None:
        return data
    first, most = partial
    return data[first : first + most]


def _header_part(structure: Part | None, section: Section) -> Part | None:
    if structure is None:
        return None
    if not section.part:
        return structure
    part = structure.find(section.part)
    if part is None or not part.is_message or part.message is None:
        return None
    return part.message


def _range(structure: Part, section: Section) -> tuple[int, int, int] | None:
    """
    The (CRLF start, CRLF end, LF start) of a section.
    """
    kind = section.kind
    if not section.part:
        if kind == "HEADER":
            return structure.start, structure.body_start, structure.start_lf
        if kind == "TEXT":
            return structure.body_start, structure.body_end, structure.body_start_lf
        return structure.start, structure.body_end, structure.start_lf
    part = structure.find(section.part)
    if part is None:
        return None
    if kind == "MIME":
        return part.start, part.body_start, part.start_lf
    if kind in ("HEADER", "TEXT"):
        if not part.is_message or part.message is None:
            return None
        inner = part.message
        if kind == "HEADER":
            return inner.start, inner.body_start, inner.start_lf
        return inner.body_start, inner.body_end, inner.body_start_lf
    return part.body_start, part.body_end, part.body_start_lf


def header_fields(header: bytes, section: Section) -> bytes:
    """
    HEADER.FIELDS and HEADER.FIELDS.NOT: the chosen fields' lines (their
    continuation lines included) in CRLF form, and the blank line.
    """
    wanted = {field.lower().encode("ascii") for field in section.fields}
    keep = section.kind == "HEADER.FIELDS"
    out: list[bytes] = []
    taking = False
    for line in header.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if taking:
                out.append(line.rstrip(b"\r") + b"\r\n")
            continue
        name = line.partition(b":")[0].strip().lower()
        taking = (name in wanted) == keep
        if taking:
            out.append(line.rstrip(b"\r") + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out).replace(b"\x00", b"\x80")


def implied_seen(items) -> bool:
    """
    Does fetching these set \\Seen (RFC 3501 6.4.5: BODY[...] and
    RFC822/RFC822.TEXT, not the PEEK forms)?
    """
    return any(isinstance(item, BodyItem) and not item.peek for item in items)

