"""
Mailbox names: what a client calls a folder, and the Maildir++ folder that
holds it (C{.Sent}, C{.Archive.2024}), the way Dovecot lays them out.

A name is Unicode text whose levels are separated by L{SEPARATOR}.  On disk
each level is written in IMAP's modified UTF-7 (RFC 3501 5.1.3), as Dovecot
writes them, and the levels are joined with C{.}: so a level cannot hold a
C{.} itself (Dovecot refuses it the same way with this layout).  C{INBOX},
in any case, is the account's Maildir itself.
"""

from __future__ import annotations

import base64

SEPARATOR = "/"
INBOX = "INBOX"
# Longest name, in octets of the folder's directory name (file systems
# allow 255).
MAX_NAME_OCTETS = 200
# Levels a name may have: a client cannot make us create deep trees.
MAX_LEVELS = 16


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


def check(name: str) -> str:
    """
    The name, normalized, if it can be a folder.

    @raise BadName: it cannot.
    """
    name = normalize(name)
    if name == INBOX:
        return name
    if not name:
        raise BadName("Empty mailbox name")
    levels = name.split(SEPARATOR)
    if len(levels) > MAX_LEVELS:
        raise BadName("Mailbox name has too many levels")
    for level in levels:
        if not level:
            raise BadName("Mailbox name has an empty level")
        if "." in level:
            raise BadName("Character not allowed in mailbox name: '.'")
        if level[0] == "~":
            raise BadName("Mailbox name level may not start with '~'")
        if any(not c.isprintable() or c in "*%\\" for c in level):
            raise BadName("Character not allowed in mailbox name")
    if is_inbox(levels[0]):
        raise BadName("INBOX has no children here")
    if len(directory(name).encode("utf-8")) > MAX_NAME_OCTETS:
        raise BadName("Mailbox name is too long")
    return name


def directory(name: str) -> str:
    """
    The Maildir++ folder of a checked name, relative to the account's
    Maildir (C{""} for INBOX).
    """
    if name == INBOX:
        return ""
    return "." + ".".join(encode_utf7(level) for level in name.split(SEPARATOR))


def from_directory(entry: str) -> str | None:
    """
    The name of a Maildir++ folder (C{.Sent.2024} is C{Sent/2024}), or
    C{None} if the entry is not one (C{.}, C{..}, dot files of other
    programs, undecodable names).
    """
    if len(entry) < 2 or entry[0] != "." or entry[1] == ".":
        return None
    levels = entry[1:].split(".")
    try:
        decoded = [decode_utf7(level) for level in levels]
    except BadName:
        return None
    if any(not level for level in decoded) or is_inbox(decoded[0]):
        return None
    return SEPARATOR.join(decoded)


def parent_names(name: str) -> list[str]:
    """
    Every ancestor of a name, nearest last: C{a/b/c} has C{a} and C{a/b}.
    """
    levels = name.split(SEPARATOR)
    return [SEPARATOR.join(levels[:n]) for n in range(1, len(levels))]
