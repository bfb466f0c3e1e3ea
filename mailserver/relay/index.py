"""
The relay queue in memory: what the runner, the admin API, the metrics and
ETRN need to know of each queued message, so that none of them reads the
queue folder on the reactor thread.

It is built once at start from the envelopes (L{build}: blocking, run it
in a thread) and then kept by the runner, which puts the new state of a
message after every change it makes or hears of.  Two orders are kept:

  - by id, which is arrival order (an id begins with the arrival time in
    milliseconds): for paging through the queue and for its oldest message;
  - by next attempt, a heap: what is due is found in time that grows with
    what is due, whatever the size of the queue.

Both are kept lazily: a removed message leaves its id in the id order and
its time in the heap until they are passed over or compacted away, so a
change costs a dictionary update and a heap push.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import NamedTuple

from mailserver.relay.queue import CorruptEntry, QueuedMessage, QueueError, QueueStore


class IndexEntry(NamedTuple):
    """
    One queued message as the index knows it.

    The index stores each as a plain tuple of strings and numbers, which
    the cyclic garbage collector stops tracking: 100,000 objects of a class
    would make each full collection walk them all (about 0.1 s, a pause
    every client would feel).  An L{IndexEntry} is made when one is asked
    for.

    @ivar pending: the addresses still to be delivered (empty when only
        reports are owed).
    @ivar domains: their domains, lower case, each once.
    @ivar next_attempt: when the runner tries it next (for a message being
        tried or waiting for a connection: when it came due).
    """

    id: str
    sender: str
    pending: tuple[str, ...]
    domains: tuple[str, ...]
    size: int
    arrival: float
    attempts: int
    next_attempt: float
    last_error: str
    delay_warned: bool


_NEXT_ATTEMPT = IndexEntry._fields.index("next_attempt")
_DOMAINS = IndexEntry._fields.index("domains")
_PENDING = IndexEntry._fields.index("pending")


class _Shared:
    """
    One copy of values many entries hold alike (a sender, a last error, a
    tuple of domains: a queue grown by an outage repeats them), in a table
    emptied when it fills so that it stays small whatever passes through.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._values: dict = {}

    def __call__(self, value):
        if len(self._values) >= self._size:
            self._values.clear()
        return self._values.setdefault(value, value)


class QueueIndex:
    def __init__(self) -> None:
        # Plain tuples (see IndexEntry) by id.
        self._entries: dict[str, tuple] = {}
        # Sorted ids, some of which may be gone; all before _first are.
        self._order: list[str] = []
        self._first = 0
        self._gone = 0
        self._due: list[tuple[float, str]] = []
        self._shared = _Shared()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entries

    def get(self, queue_id: str) -> IndexEntry | None:
        entry = self._entries.get(queue_id)
        return None if entry is None else IndexEntry._make(entry)

    def entries(self) -> Iterator[IndexEntry]:
        return map(IndexEntry._make, self._entries.values())

    def entry_for(self, message: QueuedMessage, next_attempt: float | None = None) -> IndexEntry:
        """
        The entry for C{message}, due at C{next_attempt} (default: the time
        its envelope names).
        """
        pending = tuple(r.address for r in message.pending())
        domains = self._shared(tuple(dict.fromkeys(
            a.rpartition("@")[2].lower().rstrip(".") for a in pending)))
        return IndexEntry(
            id=message.id, sender=self._shared(message.sender), pending=pending,
            domains=domains, size=message.size, arrival=message.arrival,
            attempts=message.attempts,
            next_attempt=message.next_attempt if next_attempt is None else next_attempt,
            last_error=self._shared(message.last_error), delay_warned=message.delay_warned,
        )

    # Changes.

    def put(self, entry: IndexEntry) -> None:
        """
        Add a message, or replace what is known of it; it comes due at its
        C{next_attempt}.
        """
        if entry.id not in self._entries:
            self._add_id(entry.id)
        self._entries[entry.id] = tuple(entry)
        self._push(entry.next_attempt, entry.id)

    def reschedule(self, queue_id: str, when: float) -> None:
        self._set_next_attempt(queue_id, when)
        self._push(when, queue_id)

    def reschedule_all(self, ids: list[str], when: float) -> None:
        """
        L{reschedule} many at once (a flush): past a sixteenth of the heap,
        making it anew costs less than pushing each.
        """
        for queue_id in ids:
            self._set_next_attempt(queue_id, when)
        if len(ids) <= len(self._due) // 16:
            for queue_id in ids:
                self._push(when, queue_id)
        else:
            self._heap_anew()

    def _set_next_attempt(self, queue_id: str, when: float) -> None:
        entry = self._entries[queue_id]
        self._entries[queue_id] = entry[:_NEXT_ATTEMPT] + (when,) + entry[_NEXT_ATTEMPT + 1:]

    def remove(self, queue_id: str) -> None:
        if self._entries.pop(queue_id, None) is None:
            return
        self._gone += 1
        if self._gone > 1024 and self._gone > len(self._order) // 2:
            self._order = [i for i in self._order if i in self._entries]
            self._first = self._gone = 0

    def take_over(self, other: QueueIndex) -> None:
        """
        Become C{other} (an index built elsewhere), keeping what was put
        here meanwhile.
        """
        for entry in self.entries():
            other.put(entry)
        self.__dict__.update(other.__dict__)

    def _add_id(self, queue_id: str) -> None:
        order = self._order
        if not order or queue_id > order[-1]:
            order.append(queue_id)
            return
        i = bisect_left(order, queue_id)
        if i < len(order) and order[i] == queue_id:
            self._gone -= 1  # back after a removal: its old place is good
        else:
            order.insert(i, queue_id)
        self._first = min(self._first, i)

    def _push(self, when: float, queue_id: str) -> None:
        heapq.heappush(self._due, (when, queue_id))
        if len(self._due) > 2 * len(self._entries) + 1024:
            self._heap_anew()

    def _heap_anew(self) -> None:
        self._due = [(e[_NEXT_ATTEMPT], i) for i, e in self._entries.items()]
        heapq.heapify(self._due)

    # The runner's questions.

    def _valid(self, item: tuple[float, str]) -> bool:
        entry = self._entries.get(item[1])
        return entry is not None and entry[_NEXT_ATTEMPT] == item[0]

    def next_due(self) -> float | None:
        """
        The earliest next attempt, or None when the queue is empty.
        """
        due = self._due
        while due and not self._valid(due[0]):
            heapq.heappop(due)
        return due[0][0] if due else None

    def pop_due(self, now: float) -> str | None:
        """
        The id of a message due at C{now}, earliest first, taken off the
        heap (it is due again once L{put} or L{reschedule} says so); None
        when nothing is due.
        """
        due = self._due
        while due and due[0][0] <= now:
            item = heapq.heappop(due)
            if self._valid(item):
                return item[1]
        return None

    def pending_ids(self, domain: str | None = None) -> list[str]:
        """
        The ids of the messages with a pending recipient (in C{domain}, lower
        case, when given).
        """
        if domain is None:
            return [i for i, e in self._entries.items() if e[_PENDING]]
        return [i for i, e in self._entries.items() if domain in e[_DOMAINS]]

    # The views' questions.

    def page(self, after: str | None, limit: int) -> list[IndexEntry]:
        """
        Up to C{limit} messages in id (arrival) order, from the first id
        after C{after} (from the start when None).
        """
        order, entries = self._order, self._entries
        out: list[IndexEntry] = []
        i = bisect_right(order, after) if after is not None else self._first
        while i < len(order) and len(out) < limit:
            entry = entries.get(order[i])
            if entry is not None:
                out.append(IndexEntry._make(entry))
            i += 1
        return out

    def oldest(self) -> IndexEntry | None:
        order, entries = self._order, self._entries
        while self._first < len(order) and order[self._first] not in entries:
            self._first += 1
        return self.get(order[self._first]) if self._first < len(order) else None


def build(store: QueueStore) -> tuple[QueueIndex, list[CorruptEntry]]:
    """
    Read every envelope into a new index; blocking.  Returns the index and
    the entries that cannot be used (to be set aside).
    """
    index = QueueIndex()
    corrupt = []
    for queue_id in store.ids():
        try:
            message = store.load(queue_id)
        except CorruptEntry as e:
            corrupt.append(e)
            continue
        except QueueError:
            continue  # removed meanwhile
        index.put(index.entry_for(message))
    return index, corrupt
