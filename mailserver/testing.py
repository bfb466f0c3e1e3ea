"""
Fakes of the server's collaborators, for tests of code built on it
(including third-party plugins).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from mailserver.envelope import Envelope
from mailserver.interfaces import IIntake, IMessageReceiver


class InlineThreadPool:
    """
    A thread pool that runs each call at once, in the calling thread.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor(MemoryReactorClock):
    """
    A memory reactor whose thread pool and C{callFromThread} run inline, so
    code that defers blocking work to threads finishes synchronously.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pool = InlineThreadPool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class InlineCommitter:
    """
    Runs a group commit's two phases at once in the calling thread, without
    syncing: for tests of code above the storage.
    """

    def submit(self, prepare, publish, abandon=None):
        return defer.maybeDeferred(lambda: publish(prepare()))


@implementer(IIntake)
class MemoryIntake:
    """
    Keeps accepted messages in a list as C{(envelope, bytes)}.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []
        self._ids = 0

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        return _MemoryReceiver(self, envelope)

    def has_room(self, size: int) -> bool:
        return True


@implementer(IMessageReceiver)
class _MemoryReceiver:
    def __init__(self, intake: MemoryIntake, envelope: Envelope) -> None:
        self._intake = intake
        self._envelope = envelope
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pieces.append(data)

    def finish(self):
        self._intake._ids += 1
        self._intake.messages.append((self._envelope, b"".join(self._pieces)))
        return defer.succeed(f"M{self._intake._ids}")

    def abort(self) -> None:
        self._pieces = []
