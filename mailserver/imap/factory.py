"""
The IMAP listener's factory: one per listener role, counting its sessions
against the connection caps, building them, and ending them all at
shutdown.  Kept small so the connection-admission helper every protocol
is to share can take its counting over.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailserver.imap.dependencies import IMAPDependencies
from mailserver.imap.protocol import IMAPServer


class IMAPFactory(ServerFactory):
    protocol = IMAPServer

    def __init__(self, dependencies: IMAPDependencies) -> None:
        self.dependencies = dependencies
        self.sessions: set[IMAPServer] = set()
        self._per_client: dict[str, int] = {}
        self._stopping = False

    def buildProtocol(self, addr) -> IMAPServer:
        return self.protocol(self.dependencies, self)

    def admit(self, session: IMAPServer) -> str | None:
        """
        Count a new session in, or say why not (the text of its BYE).
        """
        limits = self.dependencies.limits
        if self._stopping:
            return "Server shutting down."
        if len(self.sessions) >= limits.max_connections:
            return "[UNAVAILABLE] Too many connections."
        address = session.client_address
        if self._per_client.get(address, 0) >= limits.max_connections_per_client:
            return "[UNAVAILABLE] Too many connections from your address."
        self.sessions.add(session)
        self._per_client[address] = self._per_client.get(address, 0) + 1
        return None

    def release(self, session: IMAPServer) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            address = session.client_address
            self._per_client[address] -= 1
            if not self._per_client[address]:
                del self._per_client[address]

    def shutdown(self) -> defer.Deferred:
        """
        Tell every client BYE and refuse new ones; fires when every session
        has closed.
        """
        self._stopping = True
        sessions = list(self.sessions)
        for session in sessions:
            session.shut_down()
        return defer.DeferredList([session.closed for session in sessions])
