"""
What an IMAP session needs from the rest of the server, fixed for one
listener and handed to every session as one frozen value: its collaborators
and its own configuration sections, nothing else (no factory, no whole
configuration, no concrete store class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailserver.config import IMAP, Limits
from mailserver.imap.cache import StructureCache
from mailserver.interfaces import IFolderStore
from mailserver.login_throttle import LoginThrottle
from mailserver.memory_budget import MemoryBudget
from mailserver.metrics import ServerMetrics, unregistered_metrics


@dataclass(frozen=True)
class IMAPDependencies:
    """
    @ivar store: every account's folders.
    @ivar run_blocking: runs CPU or file work in a worker thread and
        returns a Deferred of its result (parsing a large message,
        searching message text).
    @ivar structures: parsed message structures, shared by the sessions.
    @ivar budget: the process's memory budget, which a large APPEND literal
        is held in memory under while it arrives.
    @ivar open_spill: a new anonymous file for a large literal the budget
        has no room for (binary, open for reading and writing).
    @ivar tls_options: the context for STARTTLS, or C{None} to not offer it.
    @ivar implicit_tls: the listener wraps every connection in TLS (993).
    """

    hostname: str
    portal: object
    login_throttle: LoginThrottle
    clock: object
    store: IFolderStore
    run_blocking: Callable[..., defer.Deferred]
    structures: StructureCache
    imap: IMAP
    limits: Limits
    metrics: ServerMetrics
    budget: MemoryBudget
    open_spill: Callable[[], BinaryIO]
    tls_options: object = None
    implicit_tls: bool = False

    @classmethod
    def for_listener(
        cls,
        *,
        hostname: str,
        imap: IMAP,
        limits: Limits,
        portal,
        store: IFolderStore,
        login_throttle: LoginThrottle,
        open_spill: Callable[[], BinaryIO],
        tls_options,
        reactor,
        implicit_tls: bool = False,
        metrics: ServerMetrics | None = None,
        budget: MemoryBudget | None = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        structures: StructureCache | None = None,
    ) -> IMAPDependencies:
        """
        @param imap: the C{[imap]} section.
        @param limits: the C{[limits]} section.
        @param login_throttle: failed logins per client address, shared with
            the server's other listeners.
        @param budget: by default one of C{limits.memory_budget} octets of
            this listener's own.
        @param run_blocking: by default in the reactor's thread pool.
        """
        return cls(
            hostname=hostname,
            portal=portal,
            login_throttle=login_throttle,
            clock=reactor,
            store=store,
            run_blocking=run_blocking or (
                lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            ),
            structures=structures or StructureCache(),
            imap=imap,
            limits=limits,
            metrics=metrics or unregistered_metrics(),
            budget=budget or MemoryBudget(limits.memory_budget),
            open_spill=open_spill,
            tls_options=tls_options,
            implicit_tls=implicit_tls,
        )
