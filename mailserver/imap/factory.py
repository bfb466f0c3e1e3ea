"""
The IMAP listener's factory: one per listener role, admitting its sessions
under the connection caps (L{mailserver.connection_limits}), building them,
and ending them all at shutdown.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailserver.config import Relay
from mailserver.connection_limits import ConnectionLimits, Refusal
from mailserver.imap.dependencies import IMAPDependencies
from mailserver.imap.protocol import IMAPServer

# The text of the BYE that refuses a connection (RFC 5530 UNAVAILABLE: the
# client should try again later).
_REFUSALS = {
    Refusal.CLIENT_FULL: "[UNAVAILABLE] Too many connections from your address.",
    Refusal.LISTENER_FULL: "[UNAVAILABLE] Too many connections.",
    Refusal.BUSY: "[UNAVAILABLE] Server too busy, try again later.",
    Refusal.DROP: "[UNAVAILABLE] Server too busy.",  # aborted: nobody hears it
}


class IMAPFactory(ServerFactory):
    """
    @param dependencies: what every session of this listener is given.
    @param connection_limits: the process's connection caps, shared with
        the other listeners; by default this listener's own.
    """

    protocol = IMAPServer

    def __init__(
        self, dependencies: IMAPDependencies, connection_limits: ConnectionLimits | None = None
    ) -> None:
        self.dependencies = dependencies
        self.sessions: set[IMAPServer] = set()
        connection_limits = connection_limits or ConnectionLimits.for_process(
            dependencies.limits, relay_connections=Relay().max_connections
        )
        self._limits = connection_limits.listener("imaps" if dependencies.implicit_tls else "imap")
        self._stopping = False

    def buildProtocol(self, addr) -> IMAPServer:
        return self.protocol(self.dependencies, self)

    def admit(self, session: IMAPServer) -> str | None:
        """
        Count a new session in, or say why not (the text of its BYE).
        """
        if self._stopping:
            return "Server shutting down."
        refusal = self._limits.admit(session, session.client_address)
        if refusal is not None:
            return _REFUSALS[refusal]
        self.sessions.add(session)
        return None

    def release(self, session: IMAPServer) -> None:
        self.sessions.discard(session)
        self._limits.release(session)

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
