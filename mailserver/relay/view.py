"""
The relay queue as the admin API and the metrics see it: read from the
runner's in-memory index, never from the queue folder, so a page or a
scrape costs the same with ten messages queued or 100,000.
"""

from __future__ import annotations

from collections.abc import Callable

from mailserver.relay.index import QueueIndex
from mailserver.relay.queue import QueueError
from mailserver.relay.runner import RelayRunner


class QueueAdminView:
    """
    Implements L{mailserver.web.admin.QueueView}.
    """

    def __init__(self, runner: RelayRunner, clock) -> None:
        self._runner = runner
        self._clock = clock

    def page(self, after: str | None, limit: int) -> tuple[list[dict], int, str | None]:
        index = self._runner.index
        now = self._clock.seconds()
        entries = index.page(after, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        messages = [
            {
                "id": e.id,
                "sender": e.sender,
                "recipients": list(e.pending),
                "size": e.size,
                "age_seconds": round(now - e.arrival, 3),
                "attempts": e.attempts,
                "next_attempt_in_seconds": round(max(0.0, e.next_attempt - now), 3),
                "last_error": e.last_error,
            }
            for e in entries
        ]
        return messages, len(index), entries[-1].id if more else None

    def flush(self, queue_id: str) -> bool:
        try:
            self._runner.request("flush", queue_id)
        except QueueError:
            return False
        return True


def queue_gauges(index: QueueIndex, clock) -> dict[str, Callable[[], float]]:
    """
    The relay queue's gauges for L{mailserver.metrics.server_metrics}.
    """

    def oldest_seconds() -> float:
        oldest = index.oldest()
        return clock.seconds() - oldest.arrival if oldest is not None else 0.0

    return {"queue_messages": lambda: len(index), "queue_oldest_seconds": oldest_seconds}
