"""
The SMTP listener's factory: one per listener role, counting its sessions
against the connection caps, building them, and ending them all at
shutdown.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.protocol import SMTPServer
from mailserver.smtp.replies import Reply, reply


class SMTPFactory(ServerFactory):
    """
    Builds sessions for one listener role and enforces the connection caps.

    @param dependencies: what every session of this listener is given.
    """

    protocol = SMTPServer

    def __init__(self, dependencies: SMTPDependencies) -> None:
        self.dependencies = dependencies
        self.sessions: set[SMTPServer] = set()
        self._per_client: dict[str, int] = {}
        self._stopping = False

    def buildProtocol(self, addr) -> SMTPServer:
        return self.protocol(self.dependencies, self)

    def admit(self, session: SMTPServer) -> Reply | None:
        """
        Count a new session in, or say why not (RFC 5321 3.1: 421 at the
        greeting).
        """
        limits = self.dependencies.limits
        hostname = self.dependencies.hostname
        if self._stopping:
            return reply(421, "4.3.2", f"{hostname} Service shutting down")
        if len(self.sessions) >= limits.max_connections:
            return reply(421, "4.7.0", f"{hostname} Error: too many connections")
        address = session.client_address
        if self._per_client.get(address, 0) >= limits.max_connections_per_client:
            return reply(421, "4.7.0", f"{hostname} Error: too many connections from {address}")
        self.sessions.add(session)
        self._per_client[address] = self._per_client.get(address, 0) + 1
        return None

    def release(self, session: SMTPServer) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            address = session.client_address
            self._per_client[address] -= 1
            if not self._per_client[address]:
                del self._per_client[address]

    def shutdown(self) -> defer.Deferred:
        """
        Tell every client 421 (a client in the middle of sending a message
        hears it after that message is answered) and refuse new ones.
        Fires when every session has closed.
        """
        self._stopping = True
        sessions = list(self.sessions)
        for session in sessions:
            session.shut_down()
        return defer.DeferredList([session.closed for session in sessions])
