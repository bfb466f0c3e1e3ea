"""
What an SMTP session needs from the rest of the server, fixed for one
listener: handed to every session as one frozen value, so a session sees
its collaborators and its own configuration sections and nothing else (no
factory, no whole configuration: L{SMTPDependencies.for_listener} is given
the sections, not a L{mailserver.config.Config}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailserver.config import SMTP, Limits
from mailserver.hooks import Hooks
from mailserver.interfaces import IAccounts, IIntake
from mailserver.login_throttle import LoginThrottle, throttle_for
from mailserver.message_ids import new_message_id
from mailserver.metrics import ServerMetrics, unregistered_metrics
from mailserver.smtp.policy import Policy


@dataclass(frozen=True)
class SMTPDependencies:
    """
    @ivar role: C{"smtp"} (MX) or C{"submission"} (RFC 6409), as plugins
        are told it.
    @ivar metrics_role: the role label of the metrics: C{"submissions"} on
        an implicit-TLS listener.
    @ivar tls_options: the context for STARTTLS, or C{None} to not offer it.
    @ivar implicit_tls: the listener wraps every connection in TLS (465).
    @ivar hooks: the plugins' hooks, if any.
    @ivar flush_queue: starts delivery of the queue's mail for a domain and
        returns how many messages, or C{None} when another process keeps
        the queue and the count is not known here (ETRN); C{None} without a
        relay queue.
    @ivar new_message_id: the ID of the next message (the 250 reply, our
        Received field, the stored file, the queue and the log all use it).
    """

    hostname: str
    role: str
    metrics_role: str
    policy: Policy
    intake: IIntake
    portal: object
    login_throttle: LoginThrottle
    clock: object
    smtp: SMTP
    limits: Limits
    metrics: ServerMetrics
    new_message_id: Callable[[], str]
    tls_options: object = None
    implicit_tls: bool = False
    hooks: Hooks | None = None
    flush_queue: Callable[[str], int | None] | None = None

    @classmethod
    def for_listener(
        cls,
        *,
        role: str,
        hostname: str,
        smtp: SMTP,
        limits: Limits,
        accounts: IAccounts,
        portal,
        intake: IIntake,
        tls_options,
        reactor,
        implicit_tls: bool = False,
        hooks: Hooks | None = None,
        queue_runner=None,
        metrics: ServerMetrics | None = None,
        login_throttle: LoginThrottle | None = None,
    ) -> SMTPDependencies:
        """
        @param smtp: the C{[smtp]} section.
        @param limits: the C{[limits]} section.
        @param queue_runner: the relay runner, for ETRN; C{None} if there is
            none.
        @param login_throttle: failed logins per client address, shared with
            the other listeners; by default this listener's own.
        """
        return cls(
            hostname=hostname,
            role=role,
            metrics_role="submissions" if implicit_tls else role,
            policy=Policy(smtp, role, accounts),
            intake=intake,
            portal=portal,
            login_throttle=login_throttle or throttle_for(limits, reactor),
            clock=reactor,
            smtp=smtp,
            limits=limits,
            metrics=metrics or unregistered_metrics(),
            new_message_id=new_message_id,
            tls_options=tls_options,
            implicit_tls=implicit_tls,
            hooks=hooks,
            flush_queue=queue_runner.flush if queue_runner is not None else None,
        )
