"""
Client text made safe to write into a log line or a header field we add.

A client chooses its HELO name, its addresses and its parameters; any of them
may carry characters that break a line (CR, LF, NEL U+0085, U+2028), hide or
reorder text (C1 controls, U+202E and the other bidirectional overrides) or
mean nothing on a terminal.  Every such character becomes C{?}, as in the
sender field of the transaction log, and the text is cut to a bound, so one
line stays one line and reads as what it is.
"""

from __future__ import annotations

# Longer than any address (RFC 5321 4.5.3.1: 64 + 1 + 255) or HELO name.
DEFAULT_LIMIT = 320


def printable(text: str, limit: int | None = DEFAULT_LIMIT) -> str:
    """
    C{text} with every character that is not printable (C{str.isprintable}:
    controls, format characters such as U+202E, line and paragraph
    separators, unassigned code points) replaced by C{?}, cut to C{limit}
    characters (C{None}: whole).
    """
    if limit is not None:
        text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)
