"""
Builds the running server from a L{Config}: stores, accounts, protocols and
one listener per endpoint string, under one C{MultiService}.

Nothing imports this module but L{mailserver.tap}.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailserver.accounts import Accounts, make_portal
from mailserver.config import Config, ConfigError
from mailserver.intake import Intake
from mailserver.maildir import Mailbox
from mailserver.pop3 import POP3Factory
from mailserver.smtp import SMTPFactory
from mailserver.tls import ReloadableServerOptions

LISTENERS_FILE = "listeners.json"
PID_FILE = "mailserver.pid"
_STALE_SPOOL_SECONDS = 36 * 3600


class Listener(Service):
    """
    One endpoint string of one role, listening while the service runs.

    Unlike C{StreamServerEndpointService}, a failure to listen stops the
    start-up with one line naming the role and the endpoint.
    """

    log = Logger()

    def __init__(self, role: str, description: str, factory, reactor) -> None:
        self.role = role
        self.description = description
        self.factory = factory
        self._endpoint = serverFromString(reactor, description)
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        failures = []
        d = self._endpoint.listen(self.factory)
        d.addCallbacks(self._listened, failures.append)
        if failures:
            raise SystemExit(
                f"cannot listen for {self.role} on {self.description!r}: "
                f"{failures[0].getErrorMessage()}"
            )

    def _listened(self, port) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "{role} listening on {host}:{port}",
            role=self.role,
            host=address.host,
            port=address.port,
        )
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
    Tells every connected SMTP client 421 when the server stops (RFC 5321
    3.8), before the listeners close.
    """

    def __init__(self, factories) -> None:
        self._factories = factories

    def stopService(self):
        super().stopService()
        for factory in self._factories:
            factory.shutdown()


class ReloadOnSignal(Service):
    """
    SIGHUP re-reads the accounts and aliases files and the TLS certificate,
    without dropping a connection, and writes the process id into
    C{<data_dir>/mailserver.pid} so C{mailserver reload} can send it.
    """

    log = Logger()

    def __init__(self, reactor, pid_path: Path, tls_options, accounts: Accounts) -> None:
        self._reactor = reactor
        self._pid_path = pid_path
        self._tls_options = tls_options
        self._accounts = accounts
        self._previous = None

    def startService(self) -> None:
        super().startService()
        self._pid_path.write_text(f"{os.getpid()}\n")
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def _signalled(self, signum, frame) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self._accounts.forget()
        try:
            self._tls_options.reload()
        except ConfigError as e:
            self.log.error("reload: keeping the old TLS certificate: {problem}", problem=str(e))
        else:
            self.log.info("reloaded accounts, aliases and the TLS certificate")

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        try:
            if self._pid_path.read_text().strip() == str(os.getpid()):
                self._pid_path.unlink()
        except FileNotFoundError:
            pass


def _clean_spool(spool_tmp: Path) -> None:
    """
    Remove spool files left by a crash mid-DATA: never acknowledged, so
    nobody is owed them.  Recent ones may belong to another live worker.
    """
    cutoff = time.time() - _STALE_SPOOL_SECONDS
    if not spool_tmp.is_dir():
        return
    for entry in os.scandir(spool_tmp):
        if entry.is_file() and entry.stat().st_mtime < cutoff:
            os.unlink(entry.path)


def make_service(config: Config, reactor) -> MultiService:
    """
    @raise ConfigError: when the TLS certificate is unusable.
    """
    root = MultiService()
    config.data_path.mkdir(parents=True, exist_ok=True)
    tls_options = ReloadableServerOptions(config)
    accounts = Accounts(config)
    portal = make_portal(accounts, reactor)
    intake = Intake(accounts=accounts, reactor=reactor)
    _clean_spool(intake.spool_path / "tmp")

    def mailbox_for(address: str) -> Mailbox:
        return Mailbox(accounts.mailbox_path(address))

    def smtp_factory(role: str, implicit_tls: bool) -> SMTPFactory:
        return SMTPFactory(
            config=config,
            role=role,
            accounts=accounts,
            portal=portal,
            intake=intake,
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
        )

    def pop3_factory(implicit_tls: bool) -> POP3Factory:
        return POP3Factory(
            config=config,
            portal=portal,
            mailbox_for=mailbox_for,
            tls_options=tls_options,
            reactor=reactor,
            implicit_tls=implicit_tls,
        )

    roles = {
        "smtp": lambda: smtp_factory("smtp", False),
        "submission": lambda: smtp_factory("submission", False),
        "submissions": lambda: smtp_factory("submission", True),
        "pop3": lambda: pop3_factory(False),
        "pop3s": lambda: pop3_factory(True),
    }
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
            listeners.append(Listener(role, description, served, reactor))
    # Services stop in reverse order: the ports close first, then connected
    # clients hear 421.
    ShutdownNotice(smtp_factories).setServiceParent(root)
    for listener in listeners:
        listener.setServiceParent(root)
    ListenerReport(config.data_path / LISTENERS_FILE, listeners).setServiceParent(root)
    ReloadOnSignal(reactor, config.data_path / PID_FILE, tls_options, accounts).setServiceParent(
        root
    )
    return root
