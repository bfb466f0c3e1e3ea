"""
Outbound connections kept open between messages, as Postfix's connection
cache: opening a connection (TCP, EHLO, STARTTLS, AUTH) costs more than
sending a small message over it.

A connection is kept under a L{ConnectionKey}: the destination (recipient
domain or smarthost), the MX host, its address and port, the TLS mode and
the whole TLS policy (MTA-STS included), and the AUTH user.  A message
takes a kept connection only under an equal key, so a connection opened
under one TLS policy, or authenticated for one route, never carries mail
for another.

Limits (L{ReuseLimits}, the C{relay.connection_reuse_*} keys): a connection
carries at most C{messages} messages and is used for at most C{age}
seconds after its first message, and waits at most C{idle} seconds for
the next message; then it is closed with QUIT.  The server closing an idle
connection takes it out of the cache at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer

from mailserver.relay.client import ESMTPClient
from mailserver.relay.tls_policy import TLSPolicy


@dataclass(frozen=True)
class ReuseLimits:
    """
    @ivar messages: messages one connection carries at most (1: no reuse).
    @ivar idle: seconds a connection waits for the next message.
    @ivar age: seconds after its first message a connection is not used
        again.
    """

    messages: int = 100
    idle: float = 2.0
    age: float = 300.0

    @classmethod
    def from_config(cls, relay) -> ReuseLimits:
        return cls(messages=relay.connection_reuse_count, idle=relay.connection_idle_time,
                   age=relay.connection_reuse_time)


@dataclass(frozen=True)
class ConnectionKey:
    destination: str
    host: str
    address: str
    port: int
    tls: str
    policy: TLSPolicy
    username: str


@dataclass(eq=False)
class KeptConnection:
    """
    @ivar session: the TLS session checker the connection was opened with,
        which holds what its certificate check found.
    @ivar messages: the transactions it has carried or is carrying.
    """

    client: ESMTPClient
    session: object
    opened: float | None = None
    messages: int = 1
    expiry: object = field(default=None, repr=False)


class ConnectionCache:
    """
    @param clock: for the idle and age limits.
    @param per_key: connections kept at most under one key.
    @param total: connections kept at most in all.
    """

    def __init__(self, clock, limits: ReuseLimits, per_key: int, total: int) -> None:
        self._clock = clock
        self.limits = limits
        self._per_key = per_key
        self._total = total
        self._kept: dict[ConnectionKey, list[KeptConnection]] = {}
        # The key a connection to each destination was last kept under.
        self._latest: dict[str, ConnectionKey] = {}
        self._count = 0
        self._closing = False

    def __len__(self) -> int:
        return self._count

    def key_for(self, destination: str) -> ConnectionKey | None:
        """
        The key of a connection waiting for C{destination}'s next message,
        if one is: the route and TLS policy it was opened under (Postfix
        looks in its cache by destination before any DNS lookup, too).
        """
        key = self._latest.get(destination)
        if key is not None and key not in self._kept:
            del self._latest[destination]
            return None
        return key

    def take(self, key: ConnectionKey) -> KeptConnection | None:
        """
        A kept connection for one more message under C{key}, if there is one.
        """
        waiting = self._kept.get(key)
        while waiting:
            kept = waiting.pop()  # the most recently used: the likeliest alive
            self._forget(key, kept, listed=False)
            if not kept.client.lost and not self._too_old(kept):
                kept.messages += 1
                return kept
            kept.client.quit()
        return None

    def keep(self, key: ConnectionKey, kept: KeptConnection) -> None:
        """
        Keep C{kept} for the next message under C{key}, or close it when a
        limit says so.
        """
        if kept.opened is None:
            kept.opened = self._clock.seconds()
        waiting = self._kept.setdefault(key, [])
        if (self._closing or kept.client.lost or kept.messages >= self.limits.messages
                or self._too_old(kept) or len(waiting) >= self._per_key
                or self._count >= self._total):
            if not waiting:
                del self._kept[key]
            kept.client.quit()
            return
        waiting.append(kept)
        self._latest[key.destination] = key
        self._count += 1
        kept.client.on_lost = lambda: self._forget(key, kept)
        kept.expiry = self._clock.callLater(self.limits.idle, self._expire, key, kept)

    def close(self, grace: float = 2.0) -> defer.Deferred:
        """
        Close every kept connection with QUIT, and keep no more; fires when
        they are closed, aborting those still open after C{grace} seconds.
        """
        self._closing = True
        closed = []
        for key, waiting in list(self._kept.items()):
            for kept in list(waiting):
                self._forget(key, kept)
                done: defer.Deferred = defer.Deferred()
                if kept.client.lost:
                    continue
                kept.client.quit()
                kept.client.on_lost = lambda d=done: d.called or d.callback(None)
                closed.append((kept.client, done))
        if not closed:
            return defer.succeed(None)

        def abort() -> None:
            for client, done in closed:
                if not done.called and client.transport is not None:
                    client.transport.abortConnection()

        timer = self._clock.callLater(grace, abort)
        finished = defer.gatherResults([d for _, d in closed])
        finished.addBoth(lambda _: timer.active() and timer.cancel())
        return finished

    def _too_old(self, kept: KeptConnection) -> bool:
        return kept.opened is not None and self._clock.seconds() - kept.opened >= self.limits.age

    def _expire(self, key: ConnectionKey, kept: KeptConnection) -> None:
        kept.expiry = None
        self._forget(key, kept)
        kept.client.quit()

    def _forget(self, key: ConnectionKey, kept: KeptConnection, listed: bool = True) -> None:
        """
        Take C{kept} out of the cache (C{listed}: it is still in its list).
        """
        kept.client.on_lost = None
        if kept.expiry is not None and kept.expiry.active():
            kept.expiry.cancel()
        kept.expiry = None
        waiting = self._kept.get(key, [])
        if listed:
            if kept not in waiting:
                return
            waiting.remove(kept)
        self._count -= 1
        if not waiting:
            self._kept.pop(key, None)
