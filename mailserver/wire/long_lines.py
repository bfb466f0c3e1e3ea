"""
Whether text holds a line longer than a limit, without splitting it.

Splitting a message at every LF to measure its lines makes an object per
line; this walks the text in steps of nearly the limit instead: from a line
start, the last LF within the next C{limit + 1} octets shows that the line
there fits and where the next unchecked line starts.  For mail's short
lines that is one C{bytes.rfind} (C's C{memrchr}) per thousand octets,
against a split and a length per line (a fifth of the time for 100 KiB).
"""

from __future__ import annotations


def long_line_in(text: bytes, limit: int, start: int = 0, end: int | None = None) -> bool:
    """
    Has C{text[start:end]}, whose lines end in LF (the last may not), a line
    of more than C{limit} octets before its LF?  C{start} must be a line's
    start.
    """
    if end is None:
        end = len(text)
    rfind = text.rfind
    while end - start > limit:
        last = rfind(b"\n", start, start + limit + 1)
        if last < 0:
            return True
        start = last + 1
    return False
