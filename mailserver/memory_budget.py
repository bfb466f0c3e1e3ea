"""
One memory budget for the message data a process holds.

Every buffer of a message being received or checked (the intake's pieces,
the header section and body the message hooks wait for) takes its octets
from one L{MemoryBudget} (C{limits.memory_budget}) or goes to disk: a
thousand clients sending large messages at once cannot exhaust memory, and
neither can two hundred each holding a megabyte of header fields.

The one buffer that cannot go to disk is a header section while the message
hooks look at it (L{MemoryBudget.reserve}): those wait for each other when
the budget is spent, so at most one of them is held beyond it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet import defer


class MemoryBudget:
    """
    @param limit: octets all buffers together may hold.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._reserved = 0  # by header sections being looked at
        self._waiting: deque[tuple[int, defer.Deferred]] = deque()

    def take(self, octets: int) -> bool:
        """
        Count C{octets} in if they fit (return C{True}); else the caller
        puts them on disk.
        """
        if self.held + octets > self.limit:
            return False
        self.held += octets
        return True

    def give_back(self, octets: int) -> None:
        self.held -= octets
        self._grant()

    def reserve(self, octets: int) -> defer.Deferred:
        """
        Count in C{octets} that must be in memory: at once if they fit or
        no other reservation is held, else when one of those ends (first
        come, first served).  Give them back with L{release}.
        """
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((octets, d))
        self._grant()
        return d

    def adopt(self, octets: int) -> None:
        """
        Make C{octets} already taken a reservation (see L{reserve}).
        """
        self._reserved += octets

    def release(self, octets: int) -> None:
        self._reserved -= octets
        self.give_back(octets)

    def _grant(self) -> None:
        while self._waiting:
            octets, d = self._waiting[0]
            if self.held + octets > self.limit and self._reserved:
                return
            self._waiting.popleft()
            self.held += octets
            self._reserved += octets
            d.callback(None)


# What a piece held in memory costs besides its octets: the bytes object's
# header and its place in the list.
_PIECE_OVERHEAD = 48


class SpooledBuffer:
    """
    Bytes written once and read back, held in memory while C{budget}
    allows and they stay under C{spill_size}, else in the anonymous file
    C{open_spill} returns (a binary file open for reading and writing).  Reads like a file (L{seek}, L{tell}, L{read}), for
    L{mailserver.hooks.MessageBody}.

    In memory the pieces are kept as written, each counted with its
    overhead: a growing C{bytearray} would hold up to an eighth more than
    it counts.
    """

    def __init__(
        self, budget: MemoryBudget, open_spill: Callable[[], BinaryIO], spill_size: int | None = None
    ) -> None:
        self._budget = budget
        self._open_spill = open_spill
        self._spill_size = spill_size
        self._pieces: list[bytes] | None = []
        self._counted = 0  # taken from the budget
        self._file = None
        self._position = 0
        self._cursor = (0, 0, 0)  # a position, its piece and the offset in it
        self.size = 0

    @property
    def in_memory(self) -> bool:
        return self._pieces is not None

    def write(self, data: bytes) -> None:
        """
        Add C{data} at the end.

        @raise OSError: when spooling to disk fails.
        """
        if self._pieces is not None:
            size = self.size + len(data)
            cost = len(data) + _PIECE_OVERHEAD
            fits = self._spill_size is None or size <= self._spill_size
            if fits and self._budget.take(cost):
                self._pieces.append(bytes(data))
                self._counted += cost
                self.size = size
                return
            self._spill()
        self._file.seek(0, 2)
        self._file.write(data)
        self.size += len(data)

    def _spill(self) -> None:
        self._file = self._open_spill()
        for piece in self._pieces:
            self._file.write(piece)
        self._forget_pieces()

    def _forget_pieces(self) -> None:
        self._pieces = None
        self._budget.give_back(self._counted)
        self._counted = 0

    def truncate(self, size: int) -> None:
        """
        Keep only the first C{size} octets.
        """
        if self._pieces is not None:
            kept = self._read_pieces(0, size)
            self._budget.give_back(self._counted)
            self._pieces, self._counted = [kept], len(kept) + _PIECE_OVERHEAD
            self._budget.take(self._counted)  # less than was given back
            self._cursor = (0, 0, 0)
        else:
            self._file.truncate(size)
        self.size = size

    def detach(self) -> bytes:
        """
        Everything written, taken out of an in-memory buffer, which is left
        empty: what it counted in the budget stays taken, the caller's to
        give back.
        """
        assert self._pieces is not None
        data = b"".join(self._pieces)
        self._pieces, self._counted = [], 0
        self.size = self._position = 0
        self._cursor = (0, 0, 0)
        return data

    def counted(self) -> int:
        """
        What this buffer has taken from the budget.
        """
        return self._counted

    def getvalue(self) -> bytes:
        """
        Everything written, in memory (the caller counts it).
        """
        if self._pieces is not None:
            return b"".join(self._pieces)
        self._file.seek(0)
        return self._file.read()

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self.size)[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        if self._pieces is not None:
            data = self._read_pieces(self._position, end)
        else:
            self._file.seek(self._position)
            data = self._file.read(end - self._position)
        self._position += len(data)
        return data

    def _read_pieces(self, start: int, end: int) -> bytes:
        position, index, offset = self._cursor
        if position != start:  # not where the last read ended: walk
            position, index, offset = 0, 0, 0
            while index < len(self._pieces) and position + len(self._pieces[index]) <= start:
                position += len(self._pieces[index])
                index += 1
            offset = start - position
            position = start
        out = []
        while position < end:
            piece = self._pieces[index]
            part = memoryview(piece)[offset : offset + end - position]
            out.append(part)
            position += len(part)
            offset += len(part)
            if offset == len(piece):
                index, offset = index + 1, 0
        self._cursor = (position, index, offset)
        return b"".join(out)

    def close(self) -> None:
        """
        Free the memory or the file (safe to call more than once).
        """
        if self._pieces is not None:
            self._budget.give_back(self._counted)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pieces, self._counted = [], 0
        self.size = self._position = 0
        self._cursor = (0, 0, 0)
