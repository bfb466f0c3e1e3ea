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
    what is due, whatever the size of the queue; beside it, a line of the
    messages a flush made due now (many at once, cheaper to line up than
    to push).

All are kept lazily: a removed or rescheduled message leaves its id in the
id order and its old time in the heap until they are passed over or
compacted away, so a change costs a dictionary update and a heap push.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from mailserver.relay.queue import CorruptEntry, QueuedMessage, QueueError, QueueStore


class IndexEntry(NamedTuple):
    """
    One queued message as the index knows it.

    The index stores each as a plain tuple of strings and numbers, which
    the cyclic garbage collector stops tracking: 100,000 objects of a class
    would make each full collection walk them all (about 0.1 s, a pause
    every client would feel); the next attempt, which changes most, apart.
    An L{IndexEntry} is made when one is asked for.

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
    last_error: str
    delay_warned: bool
    next_attempt: float


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
        # By id: plain tuples of the fields but the next attempt (see
        # IndexEntry), and the next attempt.
        self._entries: dict[str, tuple] = {}
        self._next: dict[str, float] = {}
        # Sorted ids, some of which may be gone; all before _first are.
        self._order: list[str] = []
        self._first = 0
        self._gone = 0
        self._due: list[tuple[float, str]] = []
        self._flushed: deque[tuple[float, str]] = deque()
        self._shared = _Shared()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entries

    def get(self, queue_id: str) -> IndexEntry | None:
        entry = self._entries.get(queue_id)
        return None if entry is None else IndexEntry._make(entry + (self._next[queue_id],))

    def entries(self) -> Iterator[IndexEntry]:
        return map(self.get, list(self._entries))

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
        self._entries[entry.id] = tuple(entry)[:-1]
        self._next[entry.id] = entry.next_attempt
        self._push(entry.next_attempt, entry.id)

    def reschedule(self, queue_id: str, when: float) -> None:
        if queue_id not in self._next:
            raise KeyError(queue_id)
        self._next[queue_id] = when
        self._push(when, queue_id)

    def due_now(self, ids: list[str], now: float) -> None:
        """
        Make these messages due at C{now} (a flush): they are kept in a line
        beside the heap, which takes them first, since pushing many onto
        the heap costs more.
        """
        for queue_id in ids:
            if queue_id not in self._next:
                raise KeyError(queue_id)
            self._next[queue_id] = now
        self._flushed.extend((now, queue_id) for queue_id in ids)

    def remove(self, queue_id: str) -> None:
        if self._entries.pop(queue_id, None) is None:
            return
        del self._next[queue_id]
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
        self._due = [(when, i) for i, when in self._next.items()]
        heapq.heapify(self._due)

    # The runner's questions.

    def _valid(self, item: tuple[float, str]) -> bool:
        return self._next.get(item[1]) == item[0]

    def next_due(self) -> float | None:
        """
        The earliest next attempt, or None when the queue is empty.  It
        may be early (a message rescheduled since, whose old time is still
        at the front), never late: passing over many such times is left to
        L{pop_due}, a few at a time.
        """
        flushed, due = self._flushed, self._due
        for _ in range(64):
            if flushed and not self._valid(flushed[0]):
                flushed.popleft()
            elif due and not self._valid(due[0]):
                heapq.heappop(due)
            else:
                break
        heads = [line[0][0] for line in (flushed, due) if line]
        return min(heads) if heads else None

    def pop_due(self, now: float, look: int) -> tuple[str | None, int]:
        """
        The id of a message due at C{now}, earliest first (the flushed
        first), taken off the heap (it is due again once L{put} or
        L{reschedule} says so), looking at no more than C{look} (>= 1) of
        the times kept; and how many it looked at.  None when nothing is
        due, or when it stopped looking.
        """
        flushed, due = self._flushed, self._due
        looked = 0
        while looked < look and (flushed or (due and due[0][0] <= now)):
            item = flushed.popleft() if flushed else heapq.heappop(due)
            looked += 1
            if self._valid(item):
                return item[1], looked
        return None, looked

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
            if order[i] in entries:
                out.append(self.get(order[i]))
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
