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

Memory is bounded: at most L{MAX_CLIENTS} addresses are remembered, the
least recently failing forgotten first.  With C{workers = N} every process
keeps its own counts and tells the others of each failure (L{share_with},
L{record}; carried by L{mailserver.worker_link}), so a guesser whose
connections the kernel spreads over the processes gets one allowance, not N.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_CLIENTS = 10_000
MAX_DELAY = 30.0


def throttle_for(limits, clock) -> LoginThrottle:
    """
    The throttle the C{[limits]} section (L{mailserver.config.Limits})
    describes.
    """
    return LoginThrottle(
        clock,
        delay=limits.auth_failure_delay,
        limit=limits.max_auth_failures_per_client,
        window=limits.auth_failure_window,
    )


def client_key(address: str) -> str:
    """
    The unit of blame: the IPv4 address, or the IPv6 /64.
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


class LoginThrottle:
    """
    @param clock: an C{IReactorTime} (its C{seconds()}).
    @param delay: seconds added to the answer of a failed login per recent
        failure from the same address.
    @param limit: recent failures after which the address is refused.
    @param window: seconds a failure counts.
    """

    def __init__(self, clock, *, delay: float, limit: int, window: float) -> None:
        self._clock = clock
        self._delay = delay
        self._limit = limit
        self._window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._tell_others: Callable[[str], None] | None = None

    def share_with(self, tell_others: Callable[[str], None]) -> None:
        """
        Have C{tell_others} called with the client key of every failure
        counted here by L{failed} (not of those L{record}ed from elsewhere).
        """
        self._tell_others = tell_others

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        cutoff = self._clock.seconds() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def refused(self, address: str) -> bool:
        """
        Has this address failed so often lately that it may not try now?
        """
        times = self._recent(client_key(address))
        return times is not None and len(times) >= self._limit

    def failed(self, address: str) -> float:
        """
        Count a failed login; return how long to wait before answering it.
        """
        key = client_key(address)
        count = self._count(key)
        if self._tell_others is not None:
            self._tell_others(key)
        return min(self._delay * count, MAX_DELAY)

    def record(self, key: str) -> None:
        """
        Count a failure another process saw from the client C{key}
        (a L{client_key}), as of now.
        """
        self._count(key)

    def _count(self, key: str) -> int:
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self._limit)
        else:
            self._failures.move_to_end(key)
        times.append(self._clock.seconds())
        while len(self._failures) > MAX_CLIENTS:
            self._failures.popitem(last=False)
        return len(times)
