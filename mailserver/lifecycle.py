"""
The services that mark the server's start and stop: the crash clean-up
before the first client, the reload on SIGHUP, the orderly goodbye on
SIGTERM.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from mailserver.accounts import Accounts
from mailserver.config import ConfigError
from mailserver.logs import emit
from mailserver.stale_tmp import maildir_tmp_folders, remove_stale_tmp
from mailserver.process import on_signal
from mailserver.safe_fs import write_file


class CrashCleanup(Service):
    """
    At start, before any client is served: remove the files a crash left in
    the spool's and every mailbox's and IMAP folder's C{tmp/} (see
    L{remove_stale_tmp}).  A
    symbolic link on the way is not followed, and logged.
    """

    log = Logger()

    def __init__(self, data_path: Path, mail_path: Path, spool_tmp: Path, host: str) -> None:
        """
        @param data_path: the data folder, below which no link is followed.
        @param host: the host part of this node's file names: only its own
            files are judged by their writer's process id.
        """
        self._data_path = data_path
        self._mail_path = mail_path
        self._spool_tmp = spool_tmp
        self._host = host

    def startService(self) -> None:
        super().startService()
        folders, links = maildir_tmp_folders(self._mail_path)
        for link in links:
            emit(self.log, LogLevel.warn, "server.link_not_followed",
                 "not following a symbolic link in the data folder", path=str(link))
        removed = 0
        for folder in [self._spool_tmp, *folders]:
            try:
                removed += remove_stale_tmp(self._data_path, folder, self._host)
            except OSError as e:
                emit(self.log, LogLevel.warn, "server.crash_cleanup_failed", "not cleaning up",
                     folder=str(folder), problem=str(e))
        if removed:
            emit(self.log, LogLevel.info, "server.crash_cleanup",
                 "removed unfinished message files left by an earlier crash", count=removed)


class ShutdownNotice(Service):
    """
    On stop, lets SMTP transactions in progress finish (up to
    C{limits.shutdown_timeout} seconds), tells every client 421 (RFC 5321
    3.8; IMAP clients BYE), then drops whoever is left: they never got a
    250, so they keep their message and try again.
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
    The primary writes its process id into C{<data_dir>/nodes/<node>/mailserver.pid} so
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
        self._restore_handler = None

    def startService(self) -> None:
        super().startService()
        if self._pid_path is not None:
            write_file(self._pid_path, f"{os.getpid()}\n")
        self._restore_handler = on_signal(signal.SIGHUP, self.reload, self._reactor)
        self._accounts.problems()  # read now: bad lines are logged at start

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
        if self._restore_handler is not None:
            self._restore_handler()
        if self._pid_path is None:
            return
        try:
            if self._pid_path.read_text().strip() == str(os.getpid()):
                self._pid_path.unlink()
        except FileNotFoundError:
            pass
