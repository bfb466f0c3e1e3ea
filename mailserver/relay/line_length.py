"""
No line over 998 octets to a peer (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1),
whatever lines the server accepted.

Postfix breaks a longer line by inserting a line end and a space
(C{smtp_line_length_limit}), which changes the text and breaks every DKIM
signature over it.  Here a message with a long line is re-encoded so that
the receiver decodes what was sent: a MIME part sent as it was (7bit,
8bit, binary, or no encoding given) becomes quoted-printable (RFC 2045
6.7); a base64 part is wrapped at 76 characters and a quoted-printable one
gets soft line breaks, which decoders remove; a long header line is folded
before a space or tab (RFC 5322 2.2.3), which unfolding (and DKIM's relaxed
canonicalisation) undoes, or broken with a line end and a space as Postfix
does when it has none.  Only what no decoder reads (a multipart preamble or
epilogue, a part in an encoding of its own) is simply broken.  A message
without MIME fields gets them (C{MIME-Version}, C{Content-Type} with its
charset when it is not ASCII, C{Content-Transfer-Encoding}) at the end of
its header section.

L{fit} changes nothing in a message whose lines all fit, and is
deterministic and idempotent, so it can run twice on the same message with
the same result: the DKIM signer (L{mailserver.mailauth.signing}) signs
C{fit} of the message, the message is stored as it was received (served
byte for byte over POP3), and the relay sends C{fit} of the stored message,
whose only difference is the signature field at the top: the signature
verifies at the peer.

Everything here works on the stored form, lines ended by LF.
"""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Callable, Iterable
from itertools import chain
from typing import BinaryIO

from mailserver.wire.long_lines import long_line_in

LIMIT = 998  # octets of a line, not counting its CRLF
_QP_LINE = 76
_BOUNDARY = re.compile(rb'(?i)[;\s]boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))')
_CHUNK = 1024 * 1024
# Messages up to this size are held in memory between the check and the send.
IN_MEMORY = 64 * 1024


def has_long_lines(message: bytes) -> bool:
    return long_line_in(message, LIMIT)


def fit(message: bytes) -> bytes:
    """
    C{message} (LF line ends) with every line at most L{LIMIT} octets.
    """
    if not has_long_lines(message):
        return message
    return b"\n".join(_entity(message.split(b"\n"), top=True, default_type=b"text/plain"))


def fitted(open_body: Callable[[], BinaryIO]) -> Callable[[], BinaryIO]:
    """
    An opener of the message C{open_body} opens, with every line fitting.

    Blocking (it reads the message once, a chunk at a time, to look for a
    long line): run it in a thread.  A message of at most L{IN_MEMORY}
    octets is kept as read, so sending it opens no file on the reactor
    thread; a longer one without a long line is opened again from its
    file; only one with a long line is read whole and re-encoded in memory.
    """
    with open_body() as body:
        first = body.read(IN_MEMORY + 1)
        if len(first) <= IN_MEMORY:
            return fitted_data(first)
        if not any_long_line(chain([first], iter(lambda: body.read(_CHUNK), b""))):
            return open_body
    with open_body() as body:
        data = fit(body.read())
    return lambda: io.BytesIO(data)


def fitted_data(data: bytes) -> Callable[[], BinaryIO]:
    """
    L{fitted} for a message at hand.  The check (L{has_long_lines}) may run
    on the reactor thread at any size: it holds the GIL throughout (about
    20 us for 100 KiB), so a thread would keep the reactor waiting as long
    and add its hand-overs; re-encoding a message over L{IN_MEMORY} octets
    is not cheap, and belongs in a thread.
    """
    if has_long_lines(data):
        data = fit(data)
    return in_memory(data)


def in_memory(data: bytes) -> Callable[[], BinaryIO]:
    """
    An opener of C{data}, for a message known to fit.
    """
    return lambda: io.BytesIO(data)


def any_long_line(chunks: Iterable[bytes]) -> bool:
    """
    Has the text in C{chunks} (split anywhere) a line over L{LIMIT} octets
    before its LF?  (A CR before the LF counts as an octet of the line.)
    """
    run = 0  # octets since the last line end, across chunks
    for chunk in chunks:
        last = chunk.rfind(b"\n")
        if last < 0:
            run += len(chunk)
        else:
            first = chunk.find(b"\n")
            if run + first > LIMIT or long_line_in(chunk, LIMIT, first + 1, last + 1):
                return True
            run = len(chunk) - last - 1
        if run > LIMIT:
            return True
    return False


# The structure of one entity (a message or a MIME part), as lines.


def _fields(head: list[bytes]) -> dict[bytes, bytes]:
    """
    The first value of each field, unfolded, by lower-case name.
    """
    fields: dict[bytes, bytes] = {}
    continued = None  # the field the next continuation line belongs to
    for line in head:
        if line[:1] in (b" ", b"\t"):
            if continued is not None:
                fields[continued] += line
            continue
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        continued = None
        if colon and name not in fields:
            fields[name] = value
            continued = name
    return fields


def _entity(lines: list[bytes], top: bool, default_type: bytes) -> list[bytes]:
    try:
        blank = lines.index(b"")
    except ValueError:
        return _fold_header(lines)  # a header section and nothing else
    head, body = lines[:blank], lines[blank + 1:]
    fields = _fields(head)
    content_type = fields.get(b"content-type", default_type)
    kind = content_type.split(b";", 1)[0].strip().lower() or default_type
    encoding = fields.get(b"content-transfer-encoding", b"7bit").strip().lower()
    head = _fold_header(head)
    boundary = _BOUNDARY.search(b";" + content_type)
    if kind.startswith(b"multipart/") and boundary:
        inner = b"message/rfc822" if kind == b"multipart/digest" else b"text/plain"
        body = _multipart(body, boundary.group(1) or boundary.group(2), inner)
    elif kind in (b"message/rfc822", b"message/global") and encoding in _AS_IS:
        body = _entity(body, top=False, default_type=b"text/plain")
    elif any(len(line) > LIMIT for line in body):
        if kind.startswith((b"multipart/", b"message/")):
            # Only 7bit, 8bit or binary are allowed here (RFC 2045 6.4).
            return head + [b""] + [piece for line in body for piece in _break(line)]
        original = body
        body, quoted = _leaf(body, encoding)
        if quoted:
            head = _declare(head, fields, b"\n".join(original), top)
    return head + [b""] + body


_AS_IS = (b"7bit", b"8bit", b"binary", b"")


def _leaf(body: list[bytes], encoding: bytes) -> tuple[list[bytes], bool]:
    """
    The body of a part with a long line, fitted; and whether it is now
    quoted-printable (so its header section must say so).
    """
    if encoding == b"base64":
        text = re.sub(rb"\s+", b"", b"".join(body))
        wrapped = [text[i:i + _QP_LINE] for i in range(0, len(text), _QP_LINE)]
        return wrapped + ([b""] if body[-1:] == [b""] else []), False
    if encoding == b"quoted-printable":
        return [piece for line in body for piece in _soft_break(line)], False
    if encoding in _AS_IS:
        encoded = binascii.b2a_qp(b"\n".join(body), quotetabs=False, istext=True, header=False)
        return [piece for line in encoded.split(b"\n") for piece in _soft_break(line)], True
    return [piece for line in body for piece in _break(line)], False


def _soft_break(line: bytes) -> list[bytes]:
    """
    A quoted-printable line cut into lines of at most 76 characters with
    soft line breaks (C{=} at the end), never inside an C{=XX}.
    """
    pieces = []
    while len(line) > _QP_LINE:
        cut = _QP_LINE - 1
        while b"=" in line[cut - 2:cut]:
            cut -= 1
        pieces.append(line[:cut] + b"=")
        line = line[cut:]
    pieces.append(line)
    return pieces


def _break(line: bytes, continuation: bytes = b"") -> list[bytes]:
    pieces = []
    while len(line) > LIMIT:
        pieces.append(line[:LIMIT])
        line = continuation + line[LIMIT:]
    pieces.append(line)
    return pieces


def _fold_header(head: list[bytes]) -> list[bytes]:
    out = []
    for line in head:
        while len(line) > LIMIT:
            cut = max(line.rfind(b" ", 1, LIMIT + 1), line.rfind(b"\t", 1, LIMIT + 1))
            if cut <= 0 or not line[:cut].strip():
                out.append(line[:LIMIT])  # no space to fold at: break, as Postfix does
                line = b" " + line[LIMIT:]
            else:
                out.append(line[:cut])
                line = line[cut:]
        out.append(line)
    return out


def _declare(head: list[bytes], fields: dict[bytes, bytes], text: bytes,
             top: bool) -> list[bytes]:
    """
    The header section of a part now quoted-printable: its
    Content-Transfer-Encoding replaced (or added), and on a message without
    MIME fields, the fields that make it MIME.
    """
    kept, skipping = [], False
    for line in head:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.partition(b":")[0].strip().lower() == b"content-transfer-encoding"
        if not skipping:
            kept.append(line)
    if top and b"mime-version" not in fields:
        kept.append(b"MIME-Version: 1.0")
    if b"content-type" not in fields:
        if not text.isascii():
            try:
                text.decode("utf-8")
                charset = b"utf-8"
            except UnicodeDecodeError:
                charset = b"unknown-8bit"  # RFC 1428
            kept.append(b"Content-Type: text/plain; charset=" + charset)
    kept.append(b"Content-Transfer-Encoding: quoted-printable")
    return kept


def _multipart(body: list[bytes], boundary: bytes, inner: bytes) -> list[bytes]:
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    out: list[bytes] = []
    part: list[bytes] | None = None  # None: in the preamble or the epilogue
    ended = False
    for line in body:
        bare = line.rstrip(b" \t")
        if not ended and bare in (delimiter, close):
            if part is not None:
                out += _entity(part, top=False, default_type=inner)
            out.append(line)
            part = [] if bare == delimiter else None
            ended = bare == close
        elif part is not None:
            part.append(line)
        else:
            out += _break(line)
    if part is not None:
        out += _entity(part, top=False, default_type=inner)
    return out
