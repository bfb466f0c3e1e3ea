"""
Which new connections a process takes on: one set of caps for every
protocol's listeners, so no protocol, listener or client can take the file
descriptors the others need.

Three caps, checked in order as a connection arrives:

 - descriptors: every connection is a descriptor, and a session may hold a
   second one (a message being spooled or sent), so this process admits at
   most a third of the descriptors it may open (C{RLIMIT_NOFILE}), less a
   reserve for everything else (L{DESCRIPTOR_RESERVE}, two per outbound
   relay connection), as sessions.  Each listener role is promised a part
   of those that the others cannot take (L{ConnectionLimits.room_for}): a
   flood of POP3 connections leaves room for SMTP.  Refused connections are answered
   and closed, and count while they close; when even that does not fit
   (twice the session allowance open at once) a connection is dropped
   unanswered, so the process never runs out and fails C{accept}.
 - C{limits.max_connections} per listener;
 - C{limits.max_connections_per_client} per listener and client address (an
   IPv6 client by its /64, as the login throttle counts it).

With C{workers = N} each process enforces its share of the two configured
caps (L{mailserver.login_throttle.share_of}), so they hold for the server as
a whole without the processes asking each other about every connection; the
descriptors are each process's own.
"""

from __future__ import annotations

import enum
import resource

from mailserver.login_throttle import client_key, share_of

# Descriptors kept for what is not a client session: listening sockets, the
# log, pipes, files the storage threads open.
DESCRIPTOR_RESERVE = 64
# A session's connection and the file it may hold, plus one more for every
# session that may be closing after a refusal.
_DESCRIPTORS_PER_SESSION = 3


class Refusal(enum.Enum):
    """
    Why a connection was not admitted; each protocol words its own reply.
    """

    BUSY = "the process has no room for another session of this role"
    LISTENER_FULL = "limits.max_connections"
    CLIENT_FULL = "limits.max_connections_per_client"
    DROP = "no room even to answer: close without a reply"


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class ConnectionLimits:
    """
    The caps of one process, shared by all its listeners.

    @param descriptors: the descriptors this process may open.
    @param reserve: how many of them are kept for other uses.
    """

    def __init__(
        self, limits, *, descriptors: int, reserve: int, processes: int = 1, index: int = 0
    ) -> None:
        self.max_connections = share_of(limits.max_connections, processes, index)
        self.max_per_client = share_of(limits.max_connections_per_client, processes, index)
        self.sessions = max(1, (descriptors - reserve) // _DESCRIPTORS_PER_SESSION)
        self._admitted: dict[str, int] = {}  # per role
        self._open = 0  # admitted or closing after a refusal

    @classmethod
    def for_process(
        cls, limits, *, relay_connections: int, processes: int = 1, index: int = 0
    ) -> ConnectionLimits:
        """
        The caps of this process, from the C{[limits]} section
        (L{mailserver.config.Limits}) and C{RLIMIT_NOFILE}.

        @param relay_connections: C{relay.max_connections}, the outbound
            connections (two descriptors each) kept out of the sessions'.
        """
        return cls(
            limits,
            descriptors=open_file_limit(),
            reserve=DESCRIPTOR_RESERVE + 2 * relay_connections,
            processes=processes,
            index=index,
        )

    def listener(self, role: str) -> ListenerLimits:
        """
        The caps of one more listener of C{role}.
        """
        self._admitted.setdefault(role, 0)
        return ListenerLimits(self, role)

    def opened(self) -> bool:
        """
        Count a new connection open, unless there is no room even to answer it.
        """
        if self._open >= 2 * self.sessions:
            return False
        self._open += 1
        return True

    def closed(self) -> None:
        self._open -= 1

    def room_for(self, role: str) -> bool:
        """
        May another session of C{role} be admitted, keeping what is promised
        to the other roles?  Each is promised half the allowance, divided
        among the roles served.
        """
        promised = self.sessions // (2 * len(self._admitted))
        owed = sum(
            max(0, promised - count) for other, count in self._admitted.items() if other != role
        )
        return sum(self._admitted.values()) + owed < self.sessions

    def admitted(self, role: str, change: int) -> None:
        self._admitted[role] += change


class ListenerLimits:
    """
    The caps of one listener.  Its factory calls L{admit} as each
    connection arrives and L{release} when it is lost, admitted or not.
    """

    def __init__(self, process: ConnectionLimits, role: str) -> None:
        self._process = process
        self._role = role
        self._admitted = 0
        self._per_client: dict[str, int] = {}
        # Each connection's client key (None: refused, closing) while open.
        self._open: dict[object, str | None] = {}

    def admit(self, session, address: str) -> Refusal | None:
        """
        Count C{session} in (return C{None}), or say why not.  One refused
        for L{Refusal.DROP} has its connection aborted here.
        """
        process = self._process
        if not process.opened():
            session.transport.abortConnection()
            return Refusal.DROP
        self._open[session] = None
        key = client_key(address)
        if not process.room_for(self._role):
            return Refusal.BUSY
        if self._admitted >= process.max_connections:
            return Refusal.LISTENER_FULL
        if self._per_client.get(key, 0) >= process.max_per_client:
            return Refusal.CLIENT_FULL
        self._open[session] = key
        self._admitted += 1
        self._per_client[key] = self._per_client.get(key, 0) + 1
        process.admitted(self._role, 1)
        return None

    def release(self, session) -> None:
        """
        C{session}'s connection is gone (nothing happens for one that was
        dropped, or released already).
        """
        if session not in self._open:
            return
        key = self._open.pop(session)
        self._process.closed()
        if key is None:
            return
        self._admitted -= 1
        self._per_client[key] -= 1
        if not self._per_client[key]:
            del self._per_client[key]
        self._process.admitted(self._role, -1)
