"""
What an IMAP session needs from the rest of the server, fixed for one
listener and handed to every session as one frozen value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailserver.config import IMAP, Config, Limits
from mailserver.imap.cache import StructureCache
from mailserver.interfaces import IFolderStore
from mailserver.login_throttle import LoginThrottle, throttle_for
from mailserver.metrics import ServerMetrics, unregistered_metrics


@dataclass(frozen=True)
class IMAPDependencies:
    """
    @ivar store: every account's folders.
    @ivar run_blocking: runs CPU or file work in a worker thread and
        returns a Deferred of its result (parsing a large message,
        searching message text).
    @ivar structures: parsed message structures, shared by the sessions.
    @ivar spool: the folder large APPEND literals are kept in while they
        arrive.
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
    spool: str
    tls_options: object = None
    implicit_tls: bool = False

    @classmethod
    def from_config(
        cls,
        *,
        config: Config,
        portal,
        store: IFolderStore,
        tls_options,
        reactor,
        implicit_tls: bool = False,
        metrics: ServerMetrics | None = None,
        login_throttle: LoginThrottle | None = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        structures: StructureCache | None = None,
    ) -> IMAPDependencies:
        return cls(
            hostname=config.hostname,
            portal=portal,
            login_throttle=login_throttle or throttle_for(config, reactor),
            clock=reactor,
            store=store,
            run_blocking=run_blocking or (
                lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            ),
            structures=structures or StructureCache(),
            imap=config.imap,
            limits=config.limits,
            metrics=metrics or unregistered_metrics(),
            spool=str(config.data_path / "spool" / "tmp"),
            tls_options=tls_options,
            implicit_tls=implicit_tls,
        )
