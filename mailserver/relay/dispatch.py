"""
When queued messages are tried: as they come due, within the connection
limits, at a cost that grows with what is due rather than with the queue.

One timer waits for the earliest next attempt in the L{QueueIndex}.  When it
fires, due messages are taken off the index's heap and started while the
limits allow: at most C{total} attempts at once, and as many to one
destination (a recipient domain, or the smarthost) as its concurrency
window allows (L{Concurrency}: from 5 up to C{per_destination} while the
destination keeps answering, as Postfix's).  A due message
whose destination is busy waits in that destination's line, out of the
heap, and starts when an attempt there ends; when every attempt slot is
taken, the rest stay in the heap until one ends.  So a domain that is down
with 100,000 messages queued holds a few attempts (its window shrinks with
each that reaches no server), and mail for other domains goes on beside
it.

A destination that could not be reached (an attempt there ended in an RFC
3463 network or routing status, 4.4.x) rests, like a destination Postfix
finds dead: for the retry schedule's delay, growing while it stays
unreachable.  Its due messages are not tried meanwhile but wait for the
end of the rest (L{Dispatcher} asks the runner, which moves them in the
index only); then a few are tried again.  So a domain that is down costs a
few attempts per rest, not one per queued message.  ETRN and C{queue
flush} end a rest (L{Dispatcher.wake}).

Taking many due messages at once (a restart after an outage, the end of a
rest) is done a batch per reactor turn, so clients are served in between.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from twisted.internet import defer

from mailserver.relay.index import IndexEntry, QueueIndex


class Dispatcher:
    """
    @param start: begins an attempt at a message; returns False when it
        cannot (an attempt at it is already running).  The runner calls
        L{finished} when the attempt ends.
    @param destinations: the destinations an attempt at an entry connects
        to.
    @param wait: C{wait(entry, until)} puts off a due message whose
        destinations all rest until C{until}; returns False when it must
        be tried all the same (it expires, say).
    @param rest_for: how long a destination rests after C{n} (>= 1)
        unreachable attempts in a row.
    """

    def __init__(
        self,
        *,
        index: QueueIndex,
        clock,
        start: Callable[[str], bool],
        destinations: Callable[[IndexEntry], tuple[str, ...]],
        wait: Callable[[IndexEntry, float], bool],
        rest_for: Callable[[int], float],
        total: int,
        per_destination: int,
        concurrency: Concurrency | None = None,
        batch: int = 200,
    ) -> None:
        """
        @param concurrency: each destination's window; by default a fixed
            C{per_destination}.
        """
        self._index = index
        self._clock = clock
        self._start = start
        self._destinations = destinations
        self._wait = wait
        self._rest_for = rest_for
        self._total = total
        self.concurrency = concurrency or Concurrency(per_destination, initial=per_destination,
                                                      adaptive=False)
        self._batch = batch
        self._running = False
        self._timer = None
        self._holding: dict[str, tuple[str, ...]] = {}
        self._by_destination: Counter = Counter()
        self._lines: dict[str, deque[str]] = {}
        self._in_line: set[str] = set()
        # Resting destinations: (until, unreachable attempts in a row).
        self._rests: dict[str, tuple[float, int]] = {}

    def start(self) -> None:
        self._running = True
        self.resume()

    def stop(self) -> None:
        self._running = False
        self._cancel()
        self._lines.clear()
        self._in_line.clear()

    @property
    def waiting(self) -> int:
        """
        Due messages waiting for their destination.
        """
        return len(self._in_line)

    def resume(self) -> None:
        """
        Look at the index again: it changed (a new message, a new time).
        """
        if not self._running or len(self._holding) >= self._total:
            return  # an attempt that ends resumes
        when = self._index.next_due()
        if when is None:
            self._cancel()
        elif self._timer is None or not self._timer.active() or self._timer.getTime() > when:
            self._arm(when - self._clock.seconds())

    def finished(self, queue_id: str) -> None:
        """
        The attempt at C{queue_id} ended: its slots are free.
        """
        if self._release(queue_id) and self._running:
            self._arm(0)

    def reached(self, key: str, reached: bool) -> float | None:
        """
        An attempt at destination C{key} reached it, or did not.  Returns
        the end of the rest this starts, or None.
        """
        now = self._clock.seconds()
        self.concurrency.reached(key, reached)
        if reached:
            self._rests.pop(key, None)
            return None
        until, failures = self._rests.get(key, (0.0, 0))
        if until > now:
            return None  # an attempt started before the rest: no news
        until = now + self._rest_for(failures + 1)
        self._rests[key] = (until, failures + 1)
        if key in self._lines and self._running:
            self._arm(0)  # its line waits too
        return until

    def wake(self, keys: list[str] | None = None) -> None:
        """
        End the rest of these destinations (of all when None).
        """
        for key in list(self._rests) if keys is None else keys:
            self._rests.pop(key, None)

    def _resting_until(self, keys: tuple[str, ...], now: float) -> float | None:
        if not keys:
            return None
        until = min(self._rests.get(key, (0.0, 0))[0] for key in keys)
        return until if until > now else None

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self, delay: float) -> None:
        self._cancel()
        self._timer = self._clock.callLater(max(0.0, delay), self._run)

    def _run(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        budget = self._batch
        for key in list(self._lines):
            budget = self._serve_line(key, budget, now)
        while budget > 0:
            if not self._running or len(self._holding) >= self._total:
                return  # an attempt that ends resumes
            queue_id, looked = self._index.pop_due(now, budget)
            budget -= looked
            if queue_id is not None:
                self._offer(queue_id, now)
            elif budget > 0:
                break  # nothing more is due
        if budget <= 0:
            self._arm(0)  # more to do: after the reactor's other work
            return
        self.resume()

    def _offer(self, queue_id: str, now: float) -> bool:
        """
        Start C{queue_id}, put it off, or put it in a line; True for the
        line.
        """
        if queue_id in self._holding or queue_id in self._in_line:
            return False
        entry = self._index.get(queue_id)
        if entry is None:
            return False
        keys = self._destinations(entry)
        until = self._resting_until(keys, now)
        if until is not None and self._wait(entry, until):
            return False
        busy = next((k for k in keys if self._by_destination[k] >= self.concurrency(k)), None)
        if busy is not None:
            self._lines.setdefault(busy, deque()).append(queue_id)
            self._in_line.add(queue_id)
            return True
        # Held before the start: an attempt may end before start returns.
        self._hold(queue_id, keys)
        if not self._start(queue_id):
            self._release(queue_id)
        return False

    def _hold(self, queue_id: str, keys: tuple[str, ...]) -> None:
        self._holding[queue_id] = keys
        for key in keys:
            self._by_destination[key] += 1

    def _release(self, queue_id: str) -> bool:
        keys = self._holding.pop(queue_id, None)
        if keys is None:
            return False
        for key in keys:
            self._by_destination[key] -= 1
            if not self._by_destination[key]:
                del self._by_destination[key]
                if key not in self._lines:
                    self.concurrency.forget(key)  # nothing there now: start afresh
        return True

    def _serve_line(self, key: str, budget: int, now: float) -> int:
        """
        Start what the line of C{key} lets start (all of it waits, when the
        destination rests), within C{budget}; returns what is left of it.
        """
        line = self._lines.get(key, deque())
        resting = self._resting_until((key,), now) is not None
        for _ in range(min(budget, len(line))):  # each at most once
            if not self._running or not (resting or (
                    len(self._holding) < self._total
                    and self._by_destination[key] < self.concurrency(key))):
                break
            queue_id = line.popleft()
            self._in_line.discard(queue_id)
            budget -= 1
            if self._offer(queue_id, now) and resting:
                break  # one that must be tried waits for a slot: so do the rest
        if not line:
            self._lines.pop(key, None)
        return budget


class Concurrency:
    """
    How many attempts (and connections) each destination may have at once:
    a window, as Postfix keeps one per destination.  It starts at
    C{initial}; each attempt that reached a server grows it by one over the
    window (one more after a window's worth), up to C{limit}; each that
    reached none shrinks it by one, down to one.  A destination with no
    attempt and nothing waiting is forgotten (L{forget}), so the table
    holds only busy destinations.  Not C{adaptive}: always C{initial}.
    """

    def __init__(self, limit: int, initial: int = 5, adaptive: bool = True) -> None:
        self.limit = limit
        self.initial = min(initial, limit)
        self._adaptive = adaptive
        self._windows: dict[str, float] = {}

    def __call__(self, key: str) -> int:
        return int(self._windows.get(key, self.initial))

    def reached(self, key: str, reached: bool) -> None:
        if not self._adaptive:
            return
        window = self._windows.get(key, float(self.initial))
        if reached:
            window = min(float(self.limit), window + 1 / int(window))
        else:
            window = max(1.0, window - 1)
        self._windows[key] = window

    def forget(self, key: str) -> None:
        self._windows.pop(key, None)


class ConnectionSlots:
    """
    Connection limits: at most C{total} at once, and C{per_key(key)} per
    destination (its L{Concurrency} window).  L{acquire} fires when a slot
    is free.  (A message with recipients in several domains makes one
    connection to each, so the attempts the L{Dispatcher} lets run may want
    more connections than there are.)
    """

    def __init__(self, total: int, per_key: Callable[[str], int]) -> None:
        self.total = total
        self.per_key = per_key
        self.used = 0
        self.by_key: Counter = Counter()
        self._waiting: deque = deque()

    def _free(self, key: str) -> bool:
        return self.used < self.total and self.by_key[key] < self.per_key(key)

    def acquire(self, key: str) -> defer.Deferred:
        if self._free(key) and all(k != key for k, _ in self._waiting):
            self._take(key)
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((key, d))
        return d

    def _take(self, key: str) -> None:
        self.used += 1
        self.by_key[key] += 1

    def release(self, key: str) -> None:
        self.used -= 1
        self.by_key[key] -= 1
        for entry in list(self._waiting):
            waiting_key, d = entry
            if self._free(waiting_key):
                self._waiting.remove(entry)
                self._take(waiting_key)
                d.callback(None)
