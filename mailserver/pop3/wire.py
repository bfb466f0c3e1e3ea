"""
What goes on the wire: status lines and multi-line responses, and the checks
applied to what comes in (user names, the peer's address).
"""

from __future__ import annotations

from collections.abc import Iterable


# Dovecot's wording, which clients and admins already know (RFC 2595 section 2).
PLAINTEXT_REFUSED = (
    "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)


def ok(text: str = "") -> bytes:
    return (f"+OK {text}" if text else "+OK").encode("utf-8") + b"\r\n"


def err(text: str) -> bytes:
    return f"-ERR {text}".encode("utf-8") + b"\r\n"


def multiline(first: bytes, lines: Iterable[str]) -> bytes:
    """
    A multi-line response: C{first} (a whole status line), the dot-stuffed
    lines, then the terminating C{.}.
    """
    body = b"".join(
        (b"." if line.startswith(".") else b"") + line.encode("utf-8") + b"\r\n"
        for line in lines
    )
    return first + body + b".\r\n"


def is_valid_user_name(name: bytes) -> bool:
    """
    A name worth asking the portal about: printable UTF-8 without spaces or
    path separators, so no name ever looks like a path.
    """
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return (
        0 < len(text) <= 255
        and not text.startswith(".")
        and all(c.isprintable() and not c.isspace() and c not in "/\\" for c in text)
    )
