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

from mailserver.mailbox_names import (
    INBOX,
    SEPARATOR,
    BadName,
    decode_utf7,
    encode_utf7,
    is_inbox,
    normalize,
)

__all__ = [
    "INBOX", "SEPARATOR", "BadName", "check", "decode_utf7", "directory", "encode_utf7",
    "from_directory", "is_inbox", "normalize", "parent_names",
]

# Longest name, in octets of the folder's directory name (file systems
# allow 255).
MAX_NAME_OCTETS = 200
# Levels a name may have: a client cannot make us create deep trees.
MAX_LEVELS = 16


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
