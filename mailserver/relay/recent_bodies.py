"""
The bodies of messages just queued, kept in memory for their first attempt.

The intake holds a small message's bytes when it commits it; the relay's
first attempt follows within milliseconds, and reading the file back (an
open, a read, a close, in a thread) was most of what a pool thread did for
each relayed message.  A body is kept only up to L{MAX_BODY} octets (what
the intake holds in memory at most) and L{MAX_TOTAL} in all (the oldest go
first), and is given out once: the first attempt takes it, and any later
attempt reads the file.
"""

from __future__ import annotations

import threading

MAX_BODY = 1024 * 1024  # mailserver.intake.SPILL_SIZE
MAX_TOTAL = 16 * 1024 * 1024


class RecentBodies:
    """
    Queue id to body, filled by group commit's thread and taken on the
    reactor's.
    """

    def __init__(self, max_body: int = MAX_BODY, max_total: int = MAX_TOTAL) -> None:
        self._max_body = max_body
        self._max_total = max_total
        self._bodies: dict[str, bytes] = {}
        self._total = 0
        self._lock = threading.Lock()

    def keep(self, queue_id: str, body: bytes) -> None:
        if len(body) > self._max_body:
            return
        with self._lock:
            if queue_id in self._bodies:
                return
            while self._bodies and self._total + len(body) > self._max_total:
                self._pop(next(iter(self._bodies)))  # the oldest
            self._bodies[queue_id] = body
            self._total += len(body)

    def take(self, queue_id: str) -> bytes | None:
        with self._lock:
            return self._pop(queue_id)

    def forget(self, queue_ids) -> None:
        with self._lock:
            for queue_id in queue_ids:
                self._pop(queue_id)

    def _pop(self, queue_id: str) -> bytes | None:
        # Under the lock.
        body = self._bodies.pop(queue_id, None)
        if body is not None:
            self._total -= len(body)
        return body

    def __len__(self) -> int:
        return len(self._bodies)

    @property
    def total(self) -> int:
        return self._total
