"""
Builds the running server from a L{Config}: stores, accounts, protocols and
one listener per endpoint string, under one C{MultiService}.

Nothing imports this module but L{mailserver.tap}.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import resource
import signal
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailserver.accounts import Accounts, make_portal, password_threadpool, strcred_checkers
from mailserver.config import Config, ConfigError
from mailserver.from_config import accounts_for, certificate_files
from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks, PluginContext
from mailserver.intake import Intake
from mailserver.mailauth import mail_auth_hooks
from mailserver.login_throttle import throttle_for
from mailserver.logs import emit
from mailserver.maildir import Mailbox, remove_stale_tmp
from mailserver.plugin_loading import load_plugins
from mailserver.pop3 import POP3Factory
from mailserver.metrics import Metrics, server_metrics
from mailserver.relay import QueueError, QueueStore, RelayRunner
from mailserver.relay.mx import make_resolver
from mailserver.smtp import SMTPFactory
from mailserver.tls import ReloadableServerOptions
from mailserver.web import make_admin_site
from mailserver.worker_link import PrimaryLink
from mailserver.workers import (
    WorkerPool,
    follow_primary,
    inherited_addresses,
    reuseport_socket,
    shared_address,
)

LISTENERS_FILE = "listeners.json"
PID_FILE = "mailserver.pid"


class Listener(Service):
    """
    One endpoint string of one role, listening while the service runs.

    Unlike C{StreamServerEndpointService}, a failure to listen stops the
    start-up with one line naming the role and the endpoint.
    """

    log = Logger()

    def __init__(
        self, role: str, description: str, factory, reactor, share: bool = False
    ) -> None:
        """
        @param share: bind a TCP endpoint with C{SO_REUSEPORT}, so worker
            processes can serve it too (see L{mailserver.workers}).
        """
        self.role = role
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self._endpoint = serverFromString(reactor, description)
        self.shared_address = shared_address(self._endpoint) if share else None
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        try:
            if self.shared_address is not None:
                self._listened(self._adopt(*self.shared_address))
                return
            failures = []
            d = self._endpoint.listen(self.factory)
            d.addCallbacks(self._listened, failures.append)
            if failures:
                failures[0].raiseException()
        except Exception as e:
            raise SystemExit(
                f"cannot listen for {self.role} on {self.description!r}: {e}"
            ) from None

    def _adopt(self, family: int, host: str, port: int, backlog: int):
        sock = reuseport_socket(family, host, port, backlog)
        try:
            listening = self._reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        address = listening.getHost()
        self.shared_address = (family, address.host, address.port, backlog)
        return listening

    def state(self) -> dict[str, object]:
        """
        For C{/health}: is this listener serving?
        """
        address = self.port.getHost() if self.port is not None else None
        return {
            "role": self.role,
            "address": f"{address.host}:{address.port}" if address else self.description,
            "listening": self.port is not None and bool(self.running),
        }

    def _listened(self, port) -> None:
        self.port = port
        address = port.getHost()
        emit(self.log, LogLevel.info, "server.listening", "listening",
             role=self.role, host=address.host, port=address.port)
        self.listening.callback(address)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class ListenerReport(Service):
    """
    Writes C{<data_dir>/listeners.json} (role to C{"host:port"} list) once
    every listener is up, so scripts and tests that asked for port 0 can find
    the ports the OS chose.
    """

    def __init__(self, path: Path, listeners: list[Listener]) -> None:
        self._path = path
        self._listeners = listeners

    def startService(self) -> None:
        super().startService()
        d = defer.gatherResults([listener.listening for listener in self._listeners])
        d.addCallback(self._write)

    def _write(self, addresses) -> None:
        report: dict[str, list[str]] = {}
        for listener, address in zip(self._listeners, addresses):
            report.setdefault(listener.role, []).append(f"{address.host}:{address.port}")
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, self._path)

    def stopService(self):
        super().stopService()
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass


class ShutdownNotice(Service):
    """
    On stop, lets SMTP transactions in progress finish (up to
    C{limits.shutdown_timeout} seconds), tells every client 421 (RFC 5321
    3.8), then drops whoever is left: they never got a 250, so they keep
    their message and try again.
    """

    log = Logger()

    def __init__(self, factories, reactor, timeout: float) -> None:
        self._factories = factories
        self._reactor = reactor
        self._timeout = timeout

    def stopService(self):
        super().stopService()
        d = defer.gatherResults([factory.shutdown() for factory in self._factories])
        d.addTimeout(self._timeout, self._reactor)
        d.addErrback(self._drop_the_rest)
        return d

    def _drop_the_rest(self, failure) -> None:
        failure.trap(defer.TimeoutError)
        for factory in self._factories:
            for session in list(factory.sessions):
                emit(self.log, LogLevel.warn, "server.session_dropped",
                     "dropping a session still open at shutdown")
                session.transport.abortConnection()


class ReloadOnSignal(Service):
    """
    SIGHUP re-reads the accounts and aliases files (logging each line that
    cannot be used) and the TLS certificate, without dropping a connection,
    and is passed on to worker processes.
    The primary writes its process id into C{<data_dir>/mailserver.pid} so
    C{mailserver reload} can find it.
    """

    log = Logger()

    def __init__(
        self, reactor, pid_path: Path | None, tls_options, accounts: Accounts, workers=None
    ) -> None:
        self._reactor = reactor
        self._pid_path = pid_path
        self._tls_options = tls_options
        self._accounts = accounts
        self._workers = workers
        self._previous = None

    def startService(self) -> None:
        super().startService()
        if self._pid_path is not None:
            self._pid_path.write_text(f"{os.getpid()}\n")
        self._previous = signal.signal(signal.SIGHUP, self._signalled)
        self._accounts.problems()  # read now: bad lines are logged at start

    def _signalled(self, signum, frame) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self._accounts.forget()
        problems = self._accounts.problems()
        if self._workers is not None:
            self._workers.signal_all(signal.SIGHUP)
        try:
            self._tls_options.reload()
        except ConfigError as e:
            emit(self.log, LogLevel.error, "server.reload_failed",
                 "keeping the old TLS certificate", problem=str(e))
        else:
            emit(self.log, LogLevel.info, "server.reloaded",
                 "reloaded accounts, aliases and the TLS certificate", bad_lines=len(problems))

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        if self._pid_path is None:
            return
        try:
            if self._pid_path.read_text().strip() == str(os.getpid()):
                self._pid_path.unlink()
        except FileNotFoundError:
            pass


def _oldest(queue: QueueStore, reactor) -> float:
    arrivals = [message.arrival for message in queue.all()]
    return reactor.seconds() - min(arrivals) if arrivals else 0.0


class QueueAdminView:
    """
    The relay queue as the admin API shows it.
    """

    def __init__(self, queue: QueueStore, runner: RelayRunner, reactor) -> None:
        self._queue = queue
        self._runner = runner
        self._reactor = reactor

    def list(self) -> list[dict]:
        now = self._reactor.seconds()
        return [
            {
                "id": m.id,
                "sender": m.sender,
                "recipients": [r.address for r in m.pending()],
                "size": m.size,
                "age_seconds": round(now - m.arrival, 3),
                "attempts": m.attempts,
                "next_attempt_in_seconds": round(max(0.0, m.next_attempt - now), 3),
                "last_error": m.last_error,
            }
            for m in self._queue.all()
        ]

    def flush(self, queue_id: str) -> bool:
        try:
            self._runner.request("flush", queue_id)
        except QueueError:
            return False
        return True


class CrashCleanup(Service):
    """
    At start, before any listener: remove the files a crash left in the
    spool's and every mailbox's C{tmp/} (see L{remove_stale_tmp}).
    """

    log = Logger()

    def __init__(self, mail_path: Path, spool_tmp: Path) -> None:
        self._mail_path = mail_path
        self._spool_tmp = spool_tmp

    def startService(self) -> None:
        super().startService()
        folders = [str(self._spool_tmp)]
        folders += glob.glob(os.path.join(glob.escape(str(self._mail_path)), "*", "*", "tmp"))
        removed = sum(remove_stale_tmp(folder) for folder in folders)
        if removed:
            emit(self.log, LogLevel.info, "server.crash_cleanup",
                 "removed unfinished message files left by an earlier crash", count=removed)


def _raise_open_file_limit() -> None:
    """
    Every connection is a file descriptor, and the usual soft limit (1024)
    is below the default connection caps: raise it to the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; connections past it are refused by the OS


_M_MMAP_THRESHOLD = -3  # glibc mallopt(3)


def _return_large_buffers() -> None:
    """
    glibc raises its mmap threshold to the size of the first large buffer
    freed, so later ones come from the freeing thread's arena and stay
    resident there for good (a 16 MiB message buffer freed in each of four
    threads keeps 64 MiB).  A fixed threshold of 1 MiB keeps large buffers
    mapped and returned to the system when freed.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc


def make_service(config: Config, reactor) -> MultiService:
    """
    @raise ConfigError: when the TLS certificate is unusable.
    """
    root = MultiService()
    _raise_open_file_limit()
    _return_large_buffers()
    config.data_path.mkdir(parents=True, exist_ok=True)
    tls_options = ReloadableServerOptions(certificate_files(config))
    accounts = accounts_for(config)
    portal = make_portal(
        accounts, reactor, strcred_checkers(config.auth.checkers),
        threadpool=password_threadpool(reactor),
    )
    queue = QueueStore(config.queue_path)
    metrics = Metrics()
    instruments = server_metrics(
        metrics,
        queue_messages=lambda: len(queue.ids()),
        queue_oldest_seconds=lambda: _oldest(queue, reactor),
    )
    context = PluginContext(reactor=reactor, hostname=config.hostname, data_path=config.data_path)
    # Authentication checks see the message as it arrived; DKIM signs it
    # as the plugins left it.
    auth_first, auth_last = mail_auth_hooks(
        checks=config.checks, dkim=config.dkim, hostname=config.hostname,
        key_folder=config.dkim_key_path, resolver=make_resolver(config.relay.resolver, reactor),
        reactor=reactor, source=config.source,
    )
    hooks = Hooks(
        auth_first + load_plugins(config.plugins, context, config.source) + auth_last,
        on_error=lambda name: instruments.plugin_errors_total.inc(plugin=name),
    )
    intake = Intake(
        accounts=accounts, reactor=reactor, data_path=config.data_path,
        hostname=config.hostname, min_free_space=config.limits.min_free_space,
        queue=queue, on_delivered=hooks.delivered,
    )
    # The runner starts before the listeners, so the queue is picked up
    # before clients connect; only the primary process runs it.
    runner = RelayRunner(
        relay=config.relay,
        hostname=config.hostname,
        queue=queue,
        intake=intake,
        reactor=reactor,
        accounts=accounts,
        metrics=instruments,
        on_delivered=hooks.delivered,
    )
    smtp_intake = intake
    if hooks.message_hooks:
        smtp_intake = HookedIntake(intake, hooks, intake.spool_path / "tmp", clock=reactor)

    # One count of failed logins per client address for every listener.
    login_throttle = throttle_for(config.limits, reactor)

    def mailbox_for(address: str) -> Mailbox:
        return Mailbox(accounts.mailbox_path(address))

    def smtp_factory(role: str, implicit_tls: bool) -> SMTPFactory:
        return SMTPFactory(
            config=config,
            role=role,
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
        )

    def pop3_factory(implicit_tls: bool) -> POP3Factory:
        return POP3Factory(
            config=config,
            portal=portal,
            mailbox_for=mailbox_for,
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
            metrics=instruments,
            login_throttle=login_throttle,
        )

    roles = {
        "smtp": lambda: smtp_factory("smtp", False),
        "submission": lambda: smtp_factory("submission", False),
        "submissions": lambda: smtp_factory("submission", True),
        "pop3": lambda: pop3_factory(False),
        "pop3s": lambda: pop3_factory(True),
    }
    inherited = inherited_addresses()
    is_worker = inherited is not None
    if is_worker:
        follow_primary()
        PrimaryLink(reactor, login_throttle, metrics).setServiceParent(root)
    share = is_worker or config.workers > 1
    listeners = []
    smtp_factories = []
    for role, make_factory in roles.items():
        for description in getattr(config.listeners, role):
            factory = make_factory()
            if isinstance(factory, SMTPFactory):
                smtp_factories.append(factory)
            served = factory
            if role in ("submissions", "pop3s"):
                served = TLSMemoryBIOFactory(tls_options, False, factory)
            listeners.append(Listener(role, description, served, reactor, share=share))
    if not is_worker:
        site = make_admin_site(
            metrics=metrics,
            listener_states=lambda: [
                listener.state() for listener in listeners if listener.role != "admin"
            ],
            queue_view=QueueAdminView(queue, runner, reactor),
            token=config.admin.token or None,
        )
        for description in config.listeners.admin:
            listeners.append(Listener("admin", description, site, reactor))
    if is_worker:
        # A worker serves only the shared TCP listeners, on the primary's ports.
        listeners = [listener for listener in listeners if listener.shared_address]
        for listener, address in zip(listeners, inherited):
            listener.shared_address = address
    else:
        CrashCleanup(config.mail_path, intake.spool_path / "tmp").setServiceParent(root)
        runner.setServiceParent(root)
    # Services stop in reverse order: the ports close first, then connected
    # clients hear 421.
    ShutdownNotice(smtp_factories, reactor, config.limits.shutdown_timeout).setServiceParent(root)
    for listener in listeners:
        listener.setServiceParent(root)
    pool = None
    if not is_worker:
        ListenerReport(config.data_path / LISTENERS_FILE, listeners).setServiceParent(root)
        if config.workers > 1:
            pool = WorkerPool(reactor, config.workers, listeners, login_throttle, metrics)
            pool.setServiceParent(root)
    pid_path = None if is_worker else config.data_path / PID_FILE
    ReloadOnSignal(reactor, pid_path, tls_options, accounts, pool).setServiceParent(root)
    return root
