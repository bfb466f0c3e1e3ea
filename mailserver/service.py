"""
The composition root: builds the running server from a L{Config}, in the
order a message meets its parts (accounts and stores, plugins, the intake
and the relay, the protocol factories, the listeners), then puts the
services under one C{MultiService} in the order they must start.

The services themselves live in their own modules (L{mailserver.listeners},
L{mailserver.lifecycle}, L{mailserver.workers}); what the server changes for
its whole process is in L{mailserver.process}.  Nothing imports this module
but L{mailserver.tap}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import MultiService
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailserver.accounts import make_portal, password_threadpool, strcred_checkers
from mailserver.config import Config, ConfigError
from mailserver.connection_limits import ConnectionLimits
from mailserver.defences import defence_hooks
from mailserver.folders.store import MailStore
from mailserver.folders.watch import watcher_for
from mailserver.from_config import accounts_for, certificate_files
from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks, PluginContext
from mailserver.imap import IMAPDependencies, IMAPFactory
from mailserver.imap.cache import StructureCache
from mailserver.intake import Intake
from mailserver.lifecycle import CrashCleanup, ReloadOnSignal, ShutdownNotice
from mailserver.listeners import Listener, ListenerReport
from mailserver.login_throttle import throttle_for
from mailserver.mailauth import mail_auth_hooks
from mailserver.maildir import MaildirStore
from mailserver.memory_budget import MemoryBudget
from mailserver.metrics import Metrics, server_metrics
from mailserver.nodes import claim as claim_node
from mailserver.ownership import Owner, acting_as, prepare_data_folder
from mailserver.plugin_loading import load_plugins
from mailserver.pop3 import POP3Dependencies, POP3Factory
from mailserver.process import (
    raise_open_file_limit,
    return_large_buffers,
    stop_signals_in_the_loop,
)
from mailserver.relay import QueueStore, RelayRunner
from mailserver.relay.index import QueueIndex
from mailserver.relay.resolver import make_resolver
from mailserver.relay.view import QueueAdminView, queue_gauges
from mailserver.relay.worker_runner import WorkerRelayRunner, relay_share
from mailserver.safe_fs import anonymous_file
from mailserver.smtp import SMTPDependencies, SMTPFactory
from mailserver.startup import StartupReport
from mailserver.tls import ReloadableServerOptions, ensure_self_signed
from mailserver.web import make_admin_site
from mailserver.worker_link import PrimaryLink
from mailserver.workers import WorkerPool, follow_primary, inherited_sockets, process_index

# Roles whose plain listeners are wrapped in TLS (ports 465, 995 and 993).
IMPLICIT_TLS_ROLES = ("submissions", "pop3s", "imaps")


def make_service(config: Config, reactor, owner: Owner | None = None,
                 worker_output: Callable[[bytes], object] | None = None) -> MultiService:
    """
    @param owner: the user C{twistd} switches to once the listeners are
        bound (C{--uid}/C{--gid}), when it was started as root: the data
        folder must be theirs, and what is made in it here is made as them.
    @param worker_output: where the worker processes' log lines go (the
        primary's log); without it, to the primary's standard output.
    @raise ConfigError: when the TLS certificate is unusable.
    @raise DataFolderError: when the data folder belongs to another user.
    """
    raise_open_file_limit()
    return_large_buffers()
    reactor.callWhenRunning(stop_signals_in_the_loop, reactor)
    prepare_data_folder(config.data_path, owner)
    with acting_as(owner):
        if inherited_sockets() is None:
            # The primary holds the node's lock until it exits (a worker's
            # primary holds it for it).
            claim_node(config.data_path, config.node_path)
        if owner is not None and config.workers > 1:
            _check_workers_can_read(config, owner)
        if not config.tls.certificate:
            ensure_self_signed(config.certificate_path, config.key_path, config.hostname)
    # Read as the starting user, so a key that only root may read works
    # (as twistd intends); a reload after the drop needs it readable by the
    # server's user.
    tls_options = ReloadableServerOptions(certificate_files(config))
    with acting_as(owner):
        return _compose(config, reactor, tls_options, worker_output)


def _check_workers_can_read(config: Config, owner: Owner) -> None:
    """
    Worker processes start as the server's user and read the configuration
    file again: say so now rather than have them fail, one after another.
    """
    if config.source == "<embedded default>":
        return
    try:
        with open(config.source, "rb"):
            pass
    except OSError as e:
        raise ConfigError(
            config.source, "workers",
            f"worker processes read this file as {owner.name}, who cannot: {e.strerror}",
        ) from None


def _compose(config: Config, reactor, tls_options: ReloadableServerOptions,
             worker_output: Callable[[bytes], object] | None) -> MultiService:
    inherited = inherited_sockets()
    is_worker = inherited is not None

    # Accounts, stores and what they report.
    accounts = accounts_for(config)
    portal = make_portal(
        accounts, reactor, strcred_checkers(config.auth.checkers),
        threadpool=password_threadpool(reactor),
    )
    queue = QueueStore(config.queue_path)
    queue_index = QueueIndex()
    metrics = Metrics()
    instruments = server_metrics(metrics, **queue_gauges(queue_index, reactor))

    # Plugins: the defences refuse before anything looks at a message;
    # authentication checks see the message as it arrived; DKIM signs it as
    # the plugins left it.
    context = PluginContext(reactor=reactor, hostname=config.hostname, data_path=config.data_path)
    resolver = make_resolver(config.relay.resolver, reactor)
    defences, defence_store = defence_hooks(
        checks=config.checks, limits=config.limits, store_path=config.defences_path,
        resolver=resolver, reactor=reactor,
    )
    auth_first, auth_last = mail_auth_hooks(
        checks=config.checks, dkim=config.dkim, hostname=config.hostname,
        key_folder=config.dkim_key_path, resolver=resolver,
        reactor=reactor, source=config.source, owns=accounts.owns,
    )
    hooks = Hooks(
        defences + auth_first + load_plugins(config.plugins, context, config.source) + auth_last,
        on_error=lambda name: instruments.plugin_errors_total.inc(plugin=name),
    )

    # Where accepted mail goes: the intake, and the relay for other domains;
    # one memory budget for every message buffer of this process.
    budget = MemoryBudget(config.limits.memory_budget)
    intake = Intake(
        accounts=accounts, reactor=reactor, data_path=config.data_path,
        hostname=config.node_name, min_free_space=config.limits.min_free_space,
        queue=queue, on_delivered=hooks.delivered, budget=budget,
    )
    smtp_intake = intake
    if hooks.message_hooks:
        smtp_intake = HookedIntake(
            intake, hooks, intake.spool_path / "tmp", clock=reactor, budget=budget,
            base=config.data_path,
        )

    # The protocols, sharing one count of failed logins per client address
    # and one set of connection caps; with workers, each process enforces
    # its share of both.
    login_throttle = throttle_for(config.limits, reactor, config.workers, process_index())
    connection_limits = ConnectionLimits.for_process(
        config.limits, relay_connections=config.relay.max_connections,
        processes=config.workers, index=process_index(),
    )

    # Every process relays (what it queued, first), with its share of the
    # connection limits; the primary keeps what is left for its retries.
    relay_parts = dict(
        relay=relay_share(config.relay, config.workers),
        hostname=config.hostname,
        mta_sts_path=config.mta_sts_path,
        queue=queue,
        index=queue_index,
        intake=intake,
        reactor=reactor,
        accounts=accounts,
        metrics=instruments,
        on_delivered=hooks.delivered,
    )
    link = PrimaryLink(reactor, login_throttle, metrics) if is_worker else None
    if link is not None:
        runner = WorkerRelayRunner(hand_over=link.tell_queued, ask_primary_to_flush=link.tell_flush,
                                   **relay_parts)
    else:
        runner = RelayRunner(**relay_parts)

    mailboxes = MaildirStore(accounts.mailbox_path, config.data_path)

    def smtp_factory(role: str, implicit_tls: bool) -> SMTPFactory:
        return SMTPFactory(SMTPDependencies.for_listener(
            role=role,
            hostname=config.hostname,
            smtp=config.smtp,
            limits=config.limits,
            accounts=accounts,
            portal=portal,
            intake=smtp_intake,
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
            hooks=hooks,
            queue_runner=runner,
            metrics=instruments,
            login_throttle=login_throttle,
        ), connection_limits)

    def pop3_factory(implicit_tls: bool) -> POP3Factory:
        return POP3Factory(POP3Dependencies.for_listener(
            hostname=config.hostname,
            pop3=config.pop3,
            limits=config.limits,
            portal=portal,
            mailboxes=mailboxes,
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
            metrics=instruments,
            login_throttle=login_throttle,
        ), connection_limits)

    def run_blocking(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    # One store of shared folders and one cache of parsed messages for
    # every IMAP listener of the process.
    folder_store = MailStore(
        accounts.mailbox_path, config.data_path, run_blocking, reactor, watcher_for(reactor), config.node_name
    )
    structures = StructureCache()

    def imap_factory(implicit_tls: bool) -> IMAPFactory:
        return IMAPFactory(IMAPDependencies.for_listener(
            hostname=config.hostname,
            imap=config.imap,
            limits=config.limits,
            portal=portal,
            store=folder_store,
            login_throttle=login_throttle,
            open_spill=lambda: anonymous_file(config.data_path, intake.spool_path / "tmp"),
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
            metrics=instruments,
            budget=budget,
            run_blocking=run_blocking,
            structures=structures,
        ), connection_limits)

    roles = {
        "smtp": lambda: smtp_factory("smtp", False),
        "submission": lambda: smtp_factory("submission", False),
        "submissions": lambda: smtp_factory("submission", True),
        "pop3": lambda: pop3_factory(False),
        "pop3s": lambda: pop3_factory(True),
        "imap": lambda: imap_factory(False),
        "imaps": lambda: imap_factory(True),
    }

    # One listener per endpoint string; with workers, the TCP ones are
    # shared (a worker serves only those, on sockets the primary bound).
    share = is_worker or config.workers > 1
    listeners = []
    # Factories whose clients are told at shutdown (SMTP 421, IMAP BYE).
    announcing = []
    for role, make_factory in roles.items():
        for description in getattr(config.listeners, role):
            factory = make_factory()
            if isinstance(factory, (SMTPFactory, IMAPFactory)):
                announcing.append(factory)
            served = factory
            if role in IMPLICIT_TLS_ROLES:
                served = TLSMemoryBIOFactory(tls_options, False, factory)
            listeners.append(Listener(role, description, served, reactor, share=share))
    if is_worker:
        listeners = [listener for listener in listeners if listener.shared_address]
        for listener, socket in zip(listeners, inherited):
            listener.inherited = socket
    else:
        site = make_admin_site(
            metrics=metrics,
            listener_states=lambda: [
                listener.state() for listener in listeners if listener.role != "admin"
            ],
            queue_view=QueueAdminView(runner, reactor),
            token=config.admin.token or None,
        )
        listeners += [
            Listener("admin", description, site, reactor)
            for description in config.listeners.admin
        ]

    # The services, in the order they start (and the reverse of the order
    # they stop).  The crash clean-up and the relay start before any client
    # is served (the listeners bind earlier, in the privileged step, but
    # nothing is accepted until the reactor runs); on stop the ports close
    # first, then connected clients hear 421 (IMAP: BYE).
    root = MultiService()
    if link is not None:
        follow_primary()
        link.setServiceParent(root)
    else:
        CrashCleanup(config.data_path, config.mail_path, intake.spool_path / "tmp",
                     intake.file_host).setServiceParent(root)
    runner.setServiceParent(root)
    defence_store.setServiceParent(root)  # stops after the sessions that use it
    ShutdownNotice(announcing, reactor, config.limits.shutdown_timeout).setServiceParent(root)
    for listener in listeners:
        listener.setServiceParent(root)
    pool = None
    if not is_worker:
        ListenerReport(config.listeners_report_path, listeners).setServiceParent(root)
        StartupReport(config, listeners, lambda: len(accounts.users())).setServiceParent(root)
        if config.workers > 1:
            pool = WorkerPool(reactor, config.workers, listeners, login_throttle, metrics,
                              on_queued=runner.scan, on_flush=runner.flush,
                              on_ended=runner.take_in_writer,
                              start_after=runner.queue_read, worker_output=worker_output)
            pool.setServiceParent(root)
    pid_path = None if is_worker else config.pid_path
    ReloadOnSignal(reactor, pid_path, tls_options, accounts, pool).setServiceParent(root)
    return root
