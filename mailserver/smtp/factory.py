"""
The SMTP listener's factory: one per listener role, admitting its sessions
under the connection caps (L{mailserver.connection_limits}), building them,
and ending them all at shutdown.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailserver.config import Relay
from mailserver.connection_limits import ConnectionLimits, Refusal
from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.protocol import SMTPServer
from mailserver.smtp.replies import Reply, reply


class SMTPFactory(ServerFactory):
    """
    Builds sessions for one listener role and enforces the connection caps.

    @param dependencies: what every session of this listener is given.
    @param connection_limits: the process's connection caps, shared with
        the other listeners; by default this listener's own.
    """

    protocol = SMTPServer

    def __init__(
        self, dependencies: SMTPDependencies, connection_limits: ConnectionLimits | None = None
    ) -> None:
        self.dependencies = dependencies
        self.sessions: set[SMTPServer] = set()
        connection_limits = connection_limits or ConnectionLimits.for_process(
            dependencies.limits, relay_connections=Relay().max_connections
        )
        self._limits = connection_limits.listener(dependencies.metrics_role)
        self._stopping = False

    def buildProtocol(self, addr) -> SMTPServer:
        return self.protocol(self.dependencies, self)

    def admit(self, session: SMTPServer) -> Reply | None:
        """
        Count a new session in, or say why not (RFC 5321 3.1: 421 at the
        greeting).
        """
        hostname = self.dependencies.hostname
        if self._stopping:
            return reply(421, "4.3.2", f"{hostname} Service shutting down")
        address = session.client_address
        refusal = self._limits.admit(session, address)
        if refusal is None:
            self.sessions.add(session)
            return None
        if refusal is Refusal.CLIENT_FULL:
            return reply(421, "4.7.0", f"{hostname} Error: too many connections from {address}")
        if refusal is Refusal.LISTENER_FULL:
            return reply(421, "4.7.0", f"{hostname} Error: too many connections")
        return reply(421, "4.3.2", f"{hostname} Error: too busy, try again later")

    def release(self, session: SMTPServer) -> None:
        self.sessions.discard(session)
        self._limits.release(session)

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
