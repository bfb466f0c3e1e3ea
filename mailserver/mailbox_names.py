"""
Mailbox names as IMAP clients and the folder store both spell them:
Unicode text whose levels are separated by L{SEPARATOR}, with C{INBOX} in
any case meaning INBOX (RFC 3501 5.1), written on the wire (and in
Maildir++ folder names, as Dovecot writes them) in modified UTF-7 (RFC
3501 5.1.3).
"""

from __future__ import annotations

import base64

SEPARATOR = "/"
INBOX = "INBOX"


class BadName(ValueError):
    """
    A name that cannot be a folder here; C{str()} says why, for the
    client.
    """


def encode_utf7(text: str) -> str:
    """
    Modified UTF-7 (RFC 3501 5.1.3): printable ASCII stands for itself,
    C{&} is C{&-}, anything else is base64 of UTF-16BE (with C{,} for
    C{/}) between C{&} and C{-}.
    """
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in text:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode_utf7(text: str) -> str:
    """
    The inverse of L{encode_utf7}.

    @raise BadName: not valid modified UTF-7.
    """
    out: list[str] = []
    position = 0
    while position < len(text):
        amp = text.find("&", position)
        if amp < 0:
            out.append(text[position:])
            break
        out.append(text[position:amp])
        end = text.find("-", amp + 1)
        if end < 0:
            raise BadName("Invalid modified UTF-7 in the name")
        if end == amp + 1:
            out.append("&")
        else:
            encoded = text[amp + 1 : end].replace(",", "/")
            try:
                raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
                decoded = raw.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError):
                raise BadName("Invalid modified UTF-7 in the name") from None
            if not decoded or any(" " <= c <= "~" for c in decoded):
                raise BadName("Invalid modified UTF-7 in the name")
            out.append(decoded)
        position = end + 1
    return "".join(out)


def is_inbox(name: str) -> bool:
    return name.upper() == INBOX


def normalize(name: str) -> str:
    """
    C{INBOX} in any case is C{INBOX} (RFC 3501 5.1); other names are as
    given.
    """
    return INBOX if is_inbox(name) else name
