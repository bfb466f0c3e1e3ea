"""
Message hooks in front of the intake.

A message hook may change the header section after the whole message has
arrived, so the header section is held in memory and the body in memory or,
when large, an anonymous spool file until the hooks have answered; only then is the message
passed to the real intake.  Without message hooks this wrapper is not used at
all, so the common path pays nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import deferLater
from zope.interface import implementer

from mailserver.envelope import Envelope
from mailserver.hooks import Hooks, MessageBody, MessageHeaders, MessageRejected
from mailserver.intake import SPILL_SIZE
from mailserver.interfaces import IIntake, IMessageReceiver

# A header section larger than this is treated as ending there: the rest is
# passed on untouched as body.
MAX_HEADER_BYTES = 1024 * 1024
_COPY_CHUNK = 256 * 1024


@implementer(IIntake)
class HookedIntake:
    """
    @param clock: when given, a large message is handed on to the intake a
        chunk per reactor turn, so copying it does not stall other sessions.
    """

    def __init__(self, intake: IIntake, hooks: Hooks, spool_tmp: Path, clock=None) -> None:
        self._intake = intake
        self._hooks = hooks
        self._spool_tmp = spool_tmp
        self._clock = clock

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        return _HookedReceiver(self._intake, self._hooks, envelope, self._spool_tmp, self._clock)

    def has_room(self, size: int) -> bool:
        return self._intake.has_room(size)


@implementer(IMessageReceiver)
class _HookedReceiver:
    def __init__(self, intake: IIntake, hooks: Hooks, envelope: Envelope, spool_tmp: Path, clock=None):
        self._intake = intake
        self._clock = clock
        self._hooks = hooks
        self._envelope = envelope
        self._head = bytearray()
        self._separator = b""
        self._in_body = False
        # In memory up to SPILL_SIZE, then on disk: most messages are small.
        self._body = tempfile.SpooledTemporaryFile(max_size=SPILL_SIZE, dir=spool_tmp)

    def write(self, data: bytes) -> None:
        if self._in_body:
            self._body.write(data)
            return
        # Search only what is new, so many small pieces cost linear time.
        start = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            self._split(end + 2, blank=True)
        elif self._head.startswith(b"\r\n"):
            self._split(0, blank=True)
        elif len(self._head) > MAX_HEADER_BYTES:
            self._split(self._head.rfind(b"\r\n") + 2, blank=False)

    def _split(self, at: int, blank: bool) -> None:
        """
        End the header section at C{at}; the empty line after it, if any,
        belongs to neither part.
        """
        self._separator = b"\r\n" if blank else b""
        self._body.write(self._head[at + len(self._separator):])
        del self._head[at:]
        self._in_body = True

    def finish(self):
        return defer.ensureDeferred(self._finish())

    async def _finish(self) -> str:
        headers = MessageHeaders(bytes(self._head))
        try:
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
            self._body.close()

    def abort(self) -> None:
        self._body.close()
