"""
Message hooks in front of the intake.

A message hook may change the header section after the whole message has
arrived, so the header section and the body are held until the hooks have
answered; only then is the message passed to the real intake.  Both are held
in memory while the process's memory budget allows (the body up to
L{SPILL_SIZE}), else in anonymous spool files; the header section is read
back into memory for the hooks, under the budget
(L{mailserver.memory_budget.MemoryBudget.reserve}).  Without message hooks
this wrapper is not used at all, so the common path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from twisted.internet import defer
from twisted.internet.task import deferLater
from zope.interface import implementer

from mailserver.config import Limits
from mailserver.envelope import Envelope
from mailserver.hooks import Hooks, MessageBody, MessageHeaders, MessageRejected
from mailserver.intake import SPILL_SIZE
from mailserver.interfaces import IIntake, IMessageReceiver
from mailserver.memory_budget import MemoryBudget, SpooledBuffer
from mailserver.safe_fs import anonymous_file

# A header section larger than this is treated as ending there: the rest is
# passed on untouched as body.
MAX_HEADER_BYTES = 1024 * 1024
_COPY_CHUNK = 256 * 1024


@implementer(IIntake)
class HookedIntake:
    """
    @param clock: when given, a large message is handed on to the intake a
        chunk per reactor turn, so copying it does not stall other sessions.
    @param budget: the process's memory budget; by default one of
        C{limits.memory_budget}'s default size of its own.
    """

    def __init__(
        self, intake: IIntake, hooks: Hooks, spool_tmp: Path, clock=None,
        budget: MemoryBudget | None = None, base: Path | None = None,
    ) -> None:
        """
        @param spool_tmp: the folder of the spill files of messages past the
            memory budget.
        @param base: the folder below which no link is followed on the way
            to C{spool_tmp} (the data folder); by default C{spool_tmp} itself.
        """
        self._intake = intake
        self._hooks = hooks
        self._open_spill = partial(anonymous_file, base or spool_tmp, spool_tmp)
        self._clock = clock
        self._budget = budget or MemoryBudget(Limits().memory_budget)

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        return _HookedReceiver(
            self._intake, self._hooks, envelope, self._open_spill, self._budget, self._clock
        )

    def has_room(self, size: int) -> bool:
        return self._intake.has_room(size)


@implementer(IMessageReceiver)
class _HookedReceiver:
    def __init__(
        self, intake: IIntake, hooks: Hooks, envelope: Envelope,
        open_spill: Callable[[], BinaryIO], budget: MemoryBudget, clock=None,
    ) -> None:
        self._intake = intake
        self._clock = clock
        self._hooks = hooks
        self._envelope = envelope
        self._budget = budget
        # MAX_HEADER_BYTES bounds the header section; the budget decides
        # where it is held.
        self._head = SpooledBuffer(budget, open_spill)
        self._tail = b""  # the header section's last three octets so far
        self._line_end = 0  # where its last complete line ends
        self._separator = b""
        self._in_body = False
        self._body = SpooledBuffer(budget, open_spill, spill_size=SPILL_SIZE)

    def write(self, data: bytes) -> None:
        if self._in_body:
            self._body.write(data)
            return
        # Search only what is new (and the end of what came before), so
        # many small pieces cost linear time.
        before = self._head.size
        window = self._tail + data
        offset = before - len(self._tail)  # of the window in the message
        end = window.find(b"\r\n\r\n")
        if before < 2 and window.startswith(b"\r\n"):
            self._split(0, b"\r\n", data)  # no header fields at all
        elif end >= 0:
            self._split(offset + end + 2, b"\r\n", data)
        else:
            line_end = window.rfind(b"\r\n")
            if line_end >= 0:
                self._line_end = offset + line_end + 2
            if before + len(data) > MAX_HEADER_BYTES:
                self._split(self._line_end, b"", data)
            else:
                self._head.write(data)
                self._tail = window[-3:]

    def _split(self, at: int, separator: bytes, data: bytes) -> None:
        """
        End the header section at C{at}, counted from the start of the
        message, of which C{data} is the piece not yet stored; the
        C{separator} (the empty line), if any, belongs to neither part.
        """
        before = self._head.size
        if at >= before:
            self._head.write(data[: at - before])
            rest = data[at - before :]
        else:
            self._head.seek(at)
            rest = self._head.read() + data
            self._head.truncate(at)
        self._separator = separator
        self._body.write(rest[len(separator) :])
        self._in_body = True

    def finish(self):
        return defer.ensureDeferred(self._finish())

    async def _finish(self) -> str:
        held = 0
        try:
            # The header section is in memory from here: it was counted in
            # the budget, or waits until it can be.
            if self._head.in_memory:
                held = self._head.counted()
                raw = self._head.detach()
                self._budget.adopt(held)
            else:
                size = self._head.size
                await self._budget.reserve(size)
                held = size
                raw = self._head.getvalue()
                self._head.close()
            headers = MessageHeaders(raw)
            verdict = await self._hooks.message(self._envelope, headers, MessageBody(self._body))
            if verdict is not None:
                raise MessageRejected(verdict)
            receiver = self._intake.begin(self._envelope)
            try:
                receiver.write(headers.to_bytes() + self._separator)
                self._body.seek(0)
                while chunk := self._body.read(_COPY_CHUNK):
                    receiver.write(chunk)
                    if self._clock is not None and len(chunk) == _COPY_CHUNK:
                        await deferLater(self._clock, 0, lambda: None)  # the others' turn
            except BaseException:
                receiver.abort()
                raise
            return await receiver.finish()
        finally:
            self._budget.release(held)
            self._head.close()
            self._body.close()

    def abort(self) -> None:
        self._head.close()
        self._body.close()
