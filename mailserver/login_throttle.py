"""
Slowing down and then refusing password guessing from one client address,
across connections and protocols (SMTP AUTH, POP3 USER/PASS and AUTH).

Counting failures per connection alone does nothing against a guesser who
opens a new connection for every try.  Here failures are remembered per
address (an IPv6 client by its /64, which one host usually owns whole) for
C{limits.auth_failure_window} seconds: each failed login is answered after
a delay that grows with the address's recent failures, as Dovecot's
C{auth_penalty} does, and past C{limits.max_auth_failures_per_client} the
address is refused outright, without its credentials being checked, until
its failures age out.

A password check counts against the limit from the moment it starts
(L{LoginThrottle.check}), not from when it fails: otherwise a guesser who
sends a hundred logins at once has them all checked before the first
failure is counted.  A check that succeeds gives its place back.

With C{workers = N} each process may spend only its share of an address's
allowance (L{share_of}: the limit divided among the processes) on checks of
its own, running or failed: two processes cannot know of each other's
checks as they start without asking each other first, which would add a
round trip to every login, so the allowance is divided instead and the
address gets at most the limit in all (one check per process if the limit is
below the number of processes).  Every process still tells the others of
each failure (L{share_with}, L{record}; carried by
L{mailserver.worker_link}), so the delays grow, and the refusal holds, with
the failures seen anywhere.

Memory is bounded: at most L{MAX_CLIENTS} addresses are remembered, the
least recently failing forgotten first; running checks are remembered until
they end.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable

from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.python.failure import Failure

MAX_CLIENTS = 10_000
MAX_DELAY = 30.0


def throttle_for(limits, clock, processes: int = 1, index: int = 0) -> LoginThrottle:
    """
    The throttle the C{[limits]} section (L{mailserver.config.Limits})
    describes, for process C{index} (0: the primary) of C{processes}.
    """
    return LoginThrottle(
        clock,
        delay=limits.auth_failure_delay,
        limit=limits.max_auth_failures_per_client,
        window=limits.auth_failure_window,
        share=share_of(limits.max_auth_failures_per_client, processes, index),
    )


def share_of(limit: int, processes: int, index: int) -> int:
    """
    Process C{index}'s part of a server-wide C{limit} divided among
    C{processes}: the parts add up to the limit, and none is below one (so
    a small limit never locks a process out).
    """
    share = limit // processes + (1 if index < limit % processes else 0)
    return max(1, share)


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """
    The unit of blame: the IPv4 address, or the IPv6 /64.  Remembered: a
    client connects again and again, and parsing an address is not free.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Failures:
    """
    Recent failure times per client key, oldest key first.
    """

    def __init__(self, clock, window: float, keep: int) -> None:
        self._clock = clock
        self._window = window
        self._keep = keep
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        cutoff = self._clock.seconds() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._times[key]
        return len(times)

    def add(self, key: str) -> int:
        if self.count(key):
            self._times.move_to_end(key)
            times = self._times[key]
        else:
            times = self._times[key] = deque(maxlen=self._keep)
        times.append(self._clock.seconds())
        while len(self._times) > MAX_CLIENTS:
            self._times.popitem(last=False)
        return len(times)


class LoginThrottle:
    """
    @param clock: an C{IReactorTime} (its C{seconds()}).
    @param delay: seconds added to the answer of a failed login per recent
        failure from the same address.
    @param limit: recent failures after which the address is refused.
    @param window: seconds a failure counts.
    @param share: this process's part of C{limit} for its own checks,
        running and failed (L{share_of}); by default all of it.
    """

    def __init__(
        self, clock, *, delay: float, limit: int, window: float, share: int | None = None
    ) -> None:
        self._delay = delay
        self._limit = limit
        self._share = limit if share is None else share
        self._failures = _Failures(clock, window, limit)  # seen anywhere
        self._own_failures = _Failures(clock, window, self._share)  # in this process
        self._running: dict[str, int] = {}
        self._tell_others: Callable[[str], None] | None = None

    def share_with(self, tell_others: Callable[[str], None]) -> None:
        """
        Have C{tell_others} called with the client key of every failure
        counted here (not of those L{record}ed from elsewhere).
        """
        self._tell_others = tell_others

    def refused(self, address: str) -> bool:
        """
        May this address not have another password checked now?
        """
        key = client_key(address)
        running = self._running.get(key, 0)
        return (
            self._failures.count(key) + running >= self._limit
            or self._own_failures.count(key) + running >= self._share
        )

    def check(self, address: str, login: Callable[[], defer.Deferred]) -> defer.Deferred | None:
        """
        Run C{login} (a password check) unless the address is L{refused}
        (then return C{None}), counting it against the limit while it runs.
        The returned Deferred has C{login}'s result; a C{LoginFailed} is
        counted as a failure before it is passed on (see L{delay}).
        """
        if self.refused(address):
            return None
        key = client_key(address)
        self._running[key] = self._running.get(key, 0) + 1
        d = defer.maybeDeferred(login)
        d.addBoth(self._ended, key)
        return d

    def _ended(self, result, key: str):
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]
        if isinstance(result, Failure) and result.check(LoginFailed):
            self._failures.add(key)
            self._own_failures.add(key)
            if self._tell_others is not None:
                self._tell_others(key)
        return result

    def delay(self, address: str) -> float:
        """
        How long to wait before answering a failed login from this address.
        """
        return min(self._delay * self._failures.count(client_key(address)), MAX_DELAY)

    def record(self, key: str) -> None:
        """
        Count a failure another process saw from the client C{key}
        (a L{client_key}), as of now.
        """
        self._failures.add(key)
