"""
The POP3 listener's factory: builds one session per connection, each given
the listener's dependencies, and admits them under the connection caps
(L{mailserver.connection_limits}).
"""

from __future__ import annotations

from twisted.internet.protocol import ServerFactory

from mailserver.config import Relay
from mailserver.connection_limits import ConnectionLimits, Refusal
from mailserver.pop3 import responses as R
from mailserver.pop3.dependencies import POP3Dependencies
from mailserver.pop3.protocol import POP3Server
from mailserver.pop3.responses import Response

# RFC 2449 [SYS/TEMP]: the client should try again later.
_REFUSALS = {
    Refusal.CLIENT_FULL: R.CLIENT_FULL,
    Refusal.LISTENER_FULL: R.LISTENER_FULL,
    Refusal.BUSY: R.SERVER_BUSY,
    Refusal.DROP: R.SERVER_BUSY,  # the connection is aborted: nobody hears it
}


class POP3Factory(ServerFactory):
    """
    @param dependencies: what every session of this listener is given.
    @param connection_limits: the process's connection caps, shared with
        the other listeners; by default this listener's own.
    """

    protocol = POP3Server

    def __init__(
        self, dependencies: POP3Dependencies, connection_limits: ConnectionLimits | None = None
    ) -> None:
        self.dependencies = dependencies
        connection_limits = connection_limits or ConnectionLimits.for_process(
            dependencies.limits, relay_connections=Relay().max_connections
        )
        self._limits = connection_limits.listener("pop3s" if dependencies.implicit_tls else "pop3")

    def buildProtocol(self, addr) -> POP3Server:
        return self.protocol(self.dependencies, self)

    def admit(self, session: POP3Server) -> Response | None:
        """
        Count a new session in, or return the response that refuses it.
        """
        refusal = self._limits.admit(session, session.client_address)
        return None if refusal is None else _REFUSALS[refusal]

    def release(self, session: POP3Server) -> None:
        self._limits.release(session)
