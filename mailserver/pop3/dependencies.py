"""
What a POP3 session needs from the rest of the server, fixed for one
listener: handed to every session as one frozen value, so a session sees
its collaborators and its own configuration sections and nothing else (no
factory, no whole configuration, no concrete mailbox class).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailserver.config import POP3, Limits
from mailserver.interfaces import IMailboxStore
from mailserver.login_throttle import LoginThrottle
from mailserver.metrics import ServerMetrics, unregistered_metrics
from mailserver.pop3.storage import sliced_on


class RecentLogins:
    """
    When each account last logged in, for RFC 2449's LOGIN-DELAY: shared
    by the sessions of a listener.

    @param delay: the least seconds between two logins of an account; 0
        for no limit (nothing is recorded then).
    """

    def __init__(self, delay: int) -> None:
        self._delay = delay
        self._last: dict[str, float] = {}

    def too_soon(self, address: str, now: float) -> bool:
        last = self._last.get(address)
        return bool(self._delay) and last is not None and now - last < self._delay

    def record(self, address: str, now: float) -> None:
        if self._delay:
            self._last[address] = now


@dataclass(frozen=True)
class POP3Dependencies:
    """
    @ivar mailboxes: every account's mailbox.
    @ivar run_blocking: runs blocking file work (opening a mailbox, reading
        messages) and returns a Deferred of its result.
    @ivar run_in_slices: runs an iterator of quick file steps (QUIT's
        renames and unlinks) on the reactor thread, a slice per turn, and
        returns a Deferred fired when it is done.
    @ivar tls_options: the context for STLS, or C{None} to not offer it.
    @ivar implicit_tls: the listener wraps every connection in TLS (995):
        no STLS, and passwords may be given at once.
    """

    hostname: str
    portal: object
    mailboxes: IMailboxStore
    login_throttle: LoginThrottle
    recent_logins: RecentLogins
    clock: object
    pop3: POP3
    limits: Limits
    metrics: ServerMetrics
    run_blocking: Callable[..., defer.Deferred]
    run_in_slices: Callable[[Iterator[None]], defer.Deferred]
    tls_options: object = None
    implicit_tls: bool = False

    @classmethod
    def for_listener(
        cls,
        *,
        hostname: str,
        pop3: POP3,
        limits: Limits,
        portal,
        mailboxes: IMailboxStore,
        login_throttle: LoginThrottle,
        tls_options,
        reactor,
        implicit_tls: bool = False,
        metrics: ServerMetrics | None = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        run_in_slices: Callable[[Iterator[None]], defer.Deferred] | None = None,
    ) -> POP3Dependencies:
        """
        @param pop3: the C{[pop3]} section.
        @param limits: the C{[limits]} section.
        @param login_throttle: failed logins per client address, shared with
            the server's other listeners.
        @param run_blocking: by default in the reactor's thread pool.
        @param run_in_slices: by default a slice of every session's steps
            per reactor turn (L{sliced_on}).
        """
        return cls(
            hostname=hostname,
            portal=portal,
            mailboxes=mailboxes,
            login_throttle=login_throttle,
            recent_logins=RecentLogins(pop3.login_delay),
            clock=reactor,
            pop3=pop3,
            limits=limits,
            metrics=metrics or unregistered_metrics(),
            run_blocking=run_blocking or (
                lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            ),
            run_in_slices=run_in_slices or sliced_on(reactor),
            tls_options=tls_options,
            implicit_tls=implicit_tls,
        )
