"""
The relay in a worker process: it sends what this process queued, at once,
so every process's core relays (as every process takes mail in), and hands
the primary whatever is still queued after that first attempt.

A worker's runner reads nothing of the queue folder: it knows only the
messages its own intake commits (their queue ids name this process, see
L{mailserver.message_ids}).  After a message's first attempt the message is
either gone (delivered, or bounced and reported) or saved and handed over:
its mark in C{incoming/} and a line to the primary, whose runner takes it
in at once and keeps its retries.  A destination this process rests, and an
attempt that fails with an error, hand over the same way.  Should the worker
end (or be killed) in the middle, the primary takes in every queued message
this process wrote that it does not know (L{RelayRunner.take_in_writer}).

Each process gets its share of the relay's connection limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from twisted.application.service import Service

from mailserver.relay.index import IndexEntry
from mailserver.relay.queue import QueuedMessage
from mailserver.relay.runner import RelayRunner


def relay_share(relay, processes: int):
    """
    C{relay} with this process's share of its connection limits, when
    C{processes} relay at once (each at least one connection).
    """
    if processes <= 1:
        return relay
    return replace(
        relay,
        max_connections=max(1, math.ceil(relay.max_connections / processes)),
        max_connections_per_destination=max(
            1, math.ceil(relay.max_connections_per_destination / processes)),
    )


class WorkerRelayRunner(RelayRunner):
    """
    @param hand_over: tells the primary of a message left in the queue
        (called with its queue id, on the reactor thread).
    @param ask_primary_to_flush: asks the primary, which keeps the queue,
        to try a domain's queued mail now (ETRN).
    """

    def __init__(
        self,
        *,
        hand_over: Callable[[str], None],
        ask_primary_to_flush: Callable[[str], None],
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._hand_over = hand_over
        self._ask_primary_to_flush = ask_primary_to_flush

    def startService(self) -> None:
        Service.startService(self)  # not the primary's: no start-up read, no scans
        self._start_courier()
        self._queue.on_enqueued = self._enqueued_in_thread
        self.queue_read.callback(None)
        self._dispatcher.start()

    def flush(self, domain: str | None = None) -> int | None:
        """
        ETRN in a worker: the queue is the primary's, so ask it; this
        process knows only its messages in flight, so the count is unknown
        (C{None}).
        """
        super().flush(domain)
        if domain:
            self._ask_primary_to_flush(domain)
        return None

    def _give(self, queue_id: str) -> None:
        self.index.remove(queue_id)
        self._fresh.pop(queue_id, None)
        self._queue.recent_bodies.forget([queue_id])  # the primary reads the file
        self._queue.announce(queue_id)
        self._hand_over(queue_id)

    def _requeue(self, message: QueuedMessage, when: float) -> None:
        self._give(message.id)

    def _back_off(self, queue_id: str) -> None:
        self._give(queue_id)

    def _wait(self, entry: IndexEntry, until: float) -> bool:
        self._give(entry.id)
        return True

    def stopService(self):
        # What is left goes to the primary (which also takes in what this
        # process wrote, once it has ended).
        for queue_id in [e.id for e in self.index.entries()]:
            if queue_id not in self._active:
                self._give(queue_id)
        return super().stopService()
