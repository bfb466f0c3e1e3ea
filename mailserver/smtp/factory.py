"""
The SMTP listener's factory: one per listener role, admitting its sessions
under the connection caps (L{mailserver.connection_limits}) and ending them
all at shutdown.
"""

from __future__ import annotations

import itertools
import secrets

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailserver.config import Config
from mailserver.connection_limits import ConnectionLimits, Refusal
from mailserver.login_throttle import LoginThrottle, throttle_for
from mailserver.metrics import ServerMetrics, unregistered_metrics
from mailserver.smtp.policy import Policy
from mailserver.smtp.protocol import SMTPServer
from mailserver.smtp.replies import Reply, reply


class SMTPFactory(ServerFactory):
    """
    Builds sessions for one listener role and enforces the connection caps.

    @param role: C{"smtp"} (MX) or C{"submission"} (RFC 6409).
    @param tls_options: the context for STARTTLS, or C{None} to not offer it.
    @param implicit_tls: the listener wraps every connection in TLS (465).
    @param hooks: the plugins' L{mailserver.hooks.Hooks}, if any.
    @param queue_runner: the relay runner, for ETRN; C{None} if there is none.
    @param login_throttle: failed logins per client address, shared with the
        other listeners; by default this listener's own.
    @param connection_limits: the process's connection caps, shared with
        the other listeners; by default this listener's own.
    """

    protocol = SMTPServer

    def __init__(
        self,
        *,
        config: Config,
        role: str,
        accounts,
        portal,
        intake,
        tls_options,
        reactor,
        implicit_tls: bool = False,
        hooks=None,
        queue_runner=None,
        metrics: ServerMetrics | None = None,
        login_throttle: LoginThrottle | None = None,
        connection_limits: ConnectionLimits | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.policy = Policy(config, role, accounts)
        self.portal = portal
        self.intake = intake
        self.tls_options = tls_options
        self.reactor = reactor
        self.implicit_tls = implicit_tls
        self.hooks = hooks
        self.queue_runner = queue_runner
        self.metrics = metrics or unregistered_metrics()
        self.metrics_role = "submissions" if implicit_tls else role
        self.login_throttle = login_throttle or throttle_for(config.limits, reactor)
        self.sessions: set[SMTPServer] = set()
        self._session_ids = itertools.count(secrets.randbits(40))
        connection_limits = connection_limits or ConnectionLimits.for_process(
            config.limits, relay_connections=config.relay.max_connections
        )
        self._limits = connection_limits.listener(self.metrics_role)
        self._stopping = False

    def next_session_id(self) -> str:
        """
        The id our Received field gives a transaction, for matching it with
        the log: a counter from a random start (no system call per message).
        """
        return f"{next(self._session_ids) & 0xFFFFFFFFFFFF:012X}"

    def buildProtocol(self, addr) -> SMTPServer:
        return self.protocol(self)

    def admit(self, session: SMTPServer) -> Reply | None:
        """
        Count a new session in, or say why not (RFC 5321 3.1: 421 at the
        greeting).
        """
        hostname = self.config.hostname
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
