"""
ENVELOPE and BODYSTRUCTURE (RFC 3501 7.4.2) from a message's parsed
structure (L{mailserver.imap.mime}).

Header values are given as they are in the message (RFC 2047 encoded
words stay encoded, as the RFC asks); octets that are not ASCII go out as
literals, unchanged.
"""

from __future__ import annotations

from mailserver.imap.mime import Part, parameters
from mailserver.imap.responses import nstring, string

_NIL = b"NIL"


def _text(value: bytes | None) -> bytes:
    return _NIL if value is None else string(value)


def _list(items: list[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


# ENVELOPE.


def envelope(part: Part) -> bytes:
    def field(name: str) -> bytes | None:
        return part.field(name)

    sender = field("sender")
    reply_to = field("reply-to")
    from_ = field("from")
    return _list([
        _text(field("date")),
        _text(field("subject")),
        address_list(from_),
        address_list(sender if sender else from_),
        address_list(reply_to if reply_to else from_),
        address_list(field("to")),
        address_list(field("cc")),
        address_list(field("bcc")),
        _text(field("in-reply-to")),
        _text(field("message-id")),
    ])


def address_list(value: bytes | None) -> bytes:
    if not value:
        return _NIL
    addresses = parse_addresses(value)
    if not addresses:
        return _NIL
    # env-from = "(" 1*address ")": no space between addresses (RFC 3501 9).
    return b"(" + b"".join(
        _list([nstring(name), _NIL, nstring(mailbox), nstring(host)])
        for name, mailbox, host in addresses
    ) + b")"


def _tokens(text: bytes) -> list[tuple[str, bytes]]:
    """
    RFC 5322 lexical tokens: ("q", quoted string), ("s", special),
    ("a", atom or dot-atom), ("c", a comment's text); white space dropped.
    """
    out: list[tuple[str, bytes]] = []
    position = 0
    length = len(text)
    while position < length:
        char = text[position : position + 1]
        if char in b" \t\r\n":
            position += 1
        elif char == b"(":
            depth = 0
            start = position
            while position < length:
                c = text[position : position + 1]
                if c == b"\\":
                    position += 1
                elif c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        break
                position += 1
            out.append(("c", text[start + 1 : position].strip()))
            position += 1
        elif char == b'"':
            value = bytearray()
            position += 1
            while position < length and text[position : position + 1] != b'"':
                if text[position : position + 1] == b"\\" and position + 1 < length:
                    position += 1
                value += text[position : position + 1]
                position += 1
            position += 1
            out.append(("q", bytes(value)))
        elif char in b"<>@,:;[]":
            out.append(("s", char))
            position += 1
        else:
            start = position
            while position < length and text[position : position + 1] not in b' \t\r\n()"<>@,:;[]':
                position += 1
            out.append(("a", text[start:position]))
    return out


def parse_addresses(value: bytes) -> list[tuple[bytes | None, bytes | None, bytes | None]]:
    """
    (name, mailbox, host) per address; a group is (None, name, None)
    before its members and (None, None, None) after them (RFC 3501 7.4.2).
    """
    tokens = _tokens(value)
    out: list[tuple[bytes | None, bytes | None, bytes | None]] = []
    current: list[tuple[str, bytes]] = []
    in_group = False
    for kind, token in tokens + [("s", b",")]:
        if kind == "s" and token == b":" and not in_group and ("s", b"<") not in current:
            out.append((None, _words(current) or b"", None))
            current = []
            in_group = True
            continue
        if kind == "s" and token in (b",", b";"):
            address = _address(current)
            if address is not None:
                out.append(address)
            current = []
            if token == b";" and in_group:
                out.append((None, None, None))
                in_group = False
            continue
        current.append((kind, token))
    if in_group:
        out.append((None, None, None))
    return out


def _words(tokens: list[tuple[str, bytes]]) -> bytes:
    return b" ".join(token for kind, token in tokens if kind != "c")


def _address(tokens: list[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None, bytes | None] | None:
    # "bob@example.org (Bob Smith)": with no phrase, the comment is the
    # name clients show (as Dovecot and Cyrus give it).
    comments = [token for kind, token in tokens if kind == "c" and token]
    tokens = [(kind, token) for kind, token in tokens if kind != "c"]
    if not tokens:
        return None
    texts = [token for _, token in tokens]
    name = None
    if b"<" in texts and ("s", b"<") in tokens:
        opening = tokens.index(("s", b"<"))
        closing = tokens.index(("s", b">")) if ("s", b">") in tokens else len(tokens)
        name = _words(tokens[:opening]) or None
        tokens = tokens[opening + 1 : closing]
        if ("s", b":") in tokens:  # an obsolete route, @a,@b:
            tokens = tokens[tokens.index(("s", b":")) + 1 :]
    if ("s", b"@") in tokens:
        at = len(tokens) - 1 - tokens[::-1].index(("s", b"@"))
        local = b"".join(token for _, token in tokens[:at])
        host = b"".join(token for _, token in tokens[at + 1 :])
    else:
        local, host = b"".join(token for _, token in tokens), b""
    if not local and not host:
        return None
    if name is None and comments:
        name = comments[-1]
    return name, local, host


# BODYSTRUCTURE.


def _params(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return _NIL
    return _list([item for name, value in params for item in (string(name), string(value))])


def _disposition(part: Part) -> bytes:
    value = part.field("content-disposition")
    if not value:
        return _NIL
    text = value.decode("utf-8", "surrogateescape")
    kind, _, rest = text.partition(";")
    if not kind.strip():
        return _NIL
    return _list([string(kind.strip().lower().encode("utf-8", "surrogateescape")), _params(parameters(rest))])


def _language(part: Part) -> bytes:
    value = part.field("content-language")
    if not value:
        return _NIL
    tags = [tag.strip() for tag in value.split(b",") if tag.strip()]
    if len(tags) == 1:
        return string(tags[0])
    return _list([string(tag) for tag in tags]) if tags else _NIL


def _encoding(part: Part) -> bytes:
    value = part.field("content-transfer-encoding")
    return string(value.strip().lower()) if value and value.strip() else b'"7bit"'


def body_structure(part: Part, extensible: bool = True) -> bytes:
    """
    BODYSTRUCTURE (C{extensible}) or BODY of a part.
    """
    if part.is_multipart:
        children = part.children or [_empty_text(part)]
        items = b"".join(body_structure(child, extensible) for child in children)
        out = [items, string(part.subtype)]
        if extensible:
            out += [_params(part.params), _disposition(part), _language(part),
                    _text(part.field("content-location"))]
        return b"(" + b" ".join(out) + b")"
    out = [
        string(part.type),
        string(part.subtype),
        _params(part.params),
        _text(part.field("content-id")),
        _text(part.field("content-description")),
        _encoding(part),
        str(part.body_size).encode("ascii"),
    ]
    if part.is_message and part.message is not None:
        out += [envelope(part.message), body_structure(part.message, extensible),
                str(part.body_lines).encode("ascii")]
    elif part.type == "text":
        out.append(str(part.body_lines).encode("ascii"))
    if extensible:
        out += [_NIL, _disposition(part), _language(part), _text(part.field("content-location"))]
    return _list(out)


def _empty_text(parent: Part) -> Part:
    """
    A multipart with no parts is shown with one empty text part, as the
    grammar needs one.
    """
    part = Part(parent.body_start, parent.body_start_lf)
    part.body_start = part.body_end = parent.body_start
    part.type, part.subtype, part.params = "text", "plain", [("charset", "us-ascii")]
    return part
