"""
The dot codec of SMTP (RFC 5321 4.5.2) and POP3 (RFC 1939 3): the text of
a message on the wire has a C{.} doubled at the start of every line that
begins with one, and ends with a line holding a single C{.}.

L{DotStuffer} turns stored text (LF line endings) into that wire form for
the relay client and POP3; L{DotReader} finds the end of the SMTP server's
DATA and undoes the stuffing.  Both work on chunks split anywhere, carrying
what they need across the split, and both work in bulk: a search and a
replace per chunk, never a Python call per line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Most chunks have no line starting with a dot; re tells that faster than
# bytes.replace's own search does for the two octets.
_LF_DOT = re.compile(rb"\n\.")
# RFC 5321 4.1.1.4: only <CRLF>.<CRLF> ends the data.  Anything else
# (<LF>.<LF>, <CR>.<CR>, <LF>.<CRLF>, ...) is content, which is what makes
# SMTP smuggling impossible here.
_END_OF_DATA = b"\r\n.\r\n"


class DotStuffer:
    """
    Stored text, LF line endings, to dot-stuffed CRLF wire text, a chunk at
    a time.  Whether the next chunk starts a line survives between chunks,
    so a C{"."} line split at any chunk boundary is stuffed all the same (a
    sender that stuffs each chunk on its own can end a message early, which
    is how SMTP smuggling works).

    Every LF becomes CRLF, even one after a stray CR: stored text has only
    LF line ends, so this gives back the received bytes.
    """

    def __init__(self) -> None:
        self.at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        stuffed = chunk.replace(b"\n.", b"\n..") if _LF_DOT.search(chunk) else chunk
        if self.at_line_start and stuffed[:1] == b".":
            stuffed = b"." + stuffed
        self.at_line_start = chunk[-1:] == b"\n"
        return stuffed.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        """
        The terminating C{.} line, after a line end if the text did not end
        with one.
        """
        return b".\r\n" if self.at_line_start else b"\r\n.\r\n"


class DotReader:
    """
    Finds C{<CRLF>.<CRLF>} in the DATA stream and passes the un-stuffed
    text to C{write}, line endings as they came.

    Every LF ends a line (a bare one too, as Postfix reads it), so a line
    starting C{..} after any LF is un-stuffed; but only C{<CRLF>.<CRLF>}
    ends the data.  The text is read as if a CRLF came just before it, so a
    message that starts with C{.} or is empty needs no special case.  Of
    each chunk, only what could begin a terminator or a stuffed dot is kept
    for the next (at most four octets, from a CR or LF): a line of any
    length costs no memory here.

    @param write: takes the message text in pieces, split anywhere.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._pending = b"\r\n"
        self._skip = 2  # the CRLF put before the text

    def feed(self, data: bytes) -> bytes | None:
        """
        Take the next bytes; return C{None} while the message goes on, or
        the bytes after the terminator once it is found.
        """
        text = self._pending + data
        first_dot_line = _LF_DOT.search(text)
        stuffed = first_dot_line is not None
        if stuffed:
            end = text.find(_END_OF_DATA, max(first_dot_line.start() - 1, 0))
            if end >= 0:
                self._pending = b""
                # Lines to un-stuff only if a dot line came before the
                # terminator's own (most messages have none).
                self._emit(text[: end + 2], first_dot_line.start() <= end)
                return text[end + len(_END_OF_DATA) :]
        # Keep from the first CR or LF of the last four octets: a
        # terminator or a stuffed dot split by this chunk's end starts there.
        size = len(text)
        cut = size
        tail = max(size - 4, 0)
        cr = text.find(b"\r", tail)
        if cr >= 0:
            cut = cr
        lf = text.find(b"\n", tail, cut)
        if lf >= 0:
            cut = lf
        self._pending = text[cut:]
        if cut:
            self._emit(text[:cut], stuffed)
        return None

    def _emit(self, text: bytes, stuffed: bool) -> None:
        if stuffed:
            text = text.replace(b"\n..", b"\n.")
        if self._skip:
            skipped = min(self._skip, len(text))
            text = text[skipped:]
            self._skip -= skipped
        if text:
            self._write(text)
