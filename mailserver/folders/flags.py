"""
IMAP flags as Maildir info letters (C{:2,DFRST}), as Dovecot maps them:
the system flags by capital letter, keywords by the lower-case letter the
folder's C{dovecot-keywords} gives them.  Capital letters with no IMAP
meaning (C{P}, "passed") are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

SYSTEM = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
_BY_LETTER = {letter: flag for flag, letter in SYSTEM.items()}
_SYSTEM_FOLDED = {flag.lower(): flag for flag in SYSTEM}
DELETED = "T"
SEEN = "S"


def canonical(flag: str) -> str:
    """
    A system flag in its usual spelling (flags match case-insensitively);
    a keyword as given.
    """
    return _SYSTEM_FOLDED.get(flag.lower(), flag)


def names(letters: str, keywords: list[str]) -> list[str]:
    """
    The IMAP flags of a file's info letters.
    """
    out = []
    for letter in letters:
        flag = _BY_LETTER.get(letter)
        if flag is not None:
            out.append(flag)
        elif "a" <= letter <= "z":
            index = ord(letter) - 97
            if index < len(keywords) and keywords[index]:
                out.append(keywords[index])
    return out


def letters(
    flags: Iterable[str], keywords: list[str], add_keywords: bool
) -> tuple[str, list[str] | None]:
    """
    The info letters of IMAP flags, and the keyword table grown by the
    new keywords among them (C{None} if it did not grow).  A keyword that
    does not fit (26 are in use, or C{add_keywords} is false) is left out.
    """
    out = set()
    table = keywords
    for flag in flags:
        letter = SYSTEM.get(canonical(flag))
        if letter is not None:
            out.add(letter)
            continue
        if flag.startswith("\\"):
            continue  # \Recent and unknown system flags are not stored
        index = _keyword_index(table, flag)
        if index is None:
            if not add_keywords or len(table) >= 26:
                continue
            if table is keywords:
                table = list(keywords)
            table.append(flag)
            index = len(table) - 1
        out.add(chr(97 + index))
    return "".join(sorted(out)), (table if table is not keywords else None)


def _keyword_index(table: list[str], flag: str) -> int | None:
    folded = flag.lower()
    for index, name in enumerate(table):
        if name.lower() == folded:
            return index
    return None


def translate(letters_: str, source: list[str], target: list[str]) -> tuple[str, list[str] | None]:
    """
    A message's letters as another folder's keyword table spells them.
    """
    flag_names = names(letters_, source)
    kept = "".join(c for c in letters_ if "A" <= c <= "Z" and c not in _BY_LETTER)
    mapped, grown = letters(flag_names, target, add_keywords=True)
    return "".join(sorted(set(mapped + kept))), grown
