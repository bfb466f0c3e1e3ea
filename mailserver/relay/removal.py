"""
Messages done with leave the relay queue in batches: while one batch is
being removed in a thread, the messages finished meanwhile wait for the
next, so a busy relay pays one thread job and one fsync of the envelope
folder per batch, not per message (L{QueueStore.remove_all}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class BatchedRemoval:
    """
    @param remove_all: C{QueueStore.remove_all}'s signature: ids in, the
        problems by id out; run through C{io}.
    @param io: runs a blocking call, returning a Deferred of its result.
    """

    def __init__(self, remove_all: Callable[[list[str]], dict[str, Exception]],
                 io: Callable[..., defer.Deferred]) -> None:
        self._remove_all = remove_all
        self._io = io
        self._waiting: list[tuple[str, defer.Deferred]] = []
        self._busy = False

    def remove(self, queue_id: str) -> defer.Deferred:
        """
        @return: a Deferred firing once C{queue_id}'s files are removed, or
            failing with why they are not.
        """
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((queue_id, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._busy = False
            return
        self._busy = True
        job = self._io(self._remove_all, [queue_id for queue_id, _ in batch])

        def answer(problems) -> None:
            for queue_id, d in batch:
                if isinstance(problems, Failure):
                    d.errback(problems)
                elif queue_id in problems:
                    d.errback(Failure(problems[queue_id]))
                else:
                    d.callback(None)
            self._next()

        job.addBoth(answer)
