"""
Several processes serving the same TCP listeners, to use every core.

The first process (the primary) binds each C{tcp:}/C{tcp6:} listener with
C{SO_REUSEPORT}, then one more socket on the same address (the port it
got, so port 0 works too) for each of its N-1 worker processes, which
inherit theirs; the kernel spreads new connections evenly over the
sockets.  Every socket is bound in the primary before C{twistd} drops
privileges: ports below 1024 need root, and the kernel lets only the user
who bound an C{SO_REUSEPORT} port bind it again.  A worker that dies finds
its socket (and the connections waiting on it) again when it is restarted.  Maildir delivery and
mailbox locks are safe across processes; each process sends the mail it
queued once and hands the primary what is left (L{mailserver.relay.worker_runner}),
so no message is sent by two processes at once.  Other endpoint types, and the admin listeners, are served by the
primary only.

Each process enforces its share of the per-server limits on logins and
connections (L{mailserver.login_throttle.share_of}), so they hold for the
server as a whole.  The processes talk over pipes (L{mailserver.worker_link}):
each worker tells the primary of every failed login it counts, and the
primary tells every other process, so login delays grow with them all;
each worker sends the primary its metric counts, which the primary's
C{/metrics} adds to its own (and keeps those of a worker that ended).

Twisted's TCP endpoints cannot set C{SO_REUSEPORT}, so the sockets are made
here and handed to C{reactor.adoptStreamPort}.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel

from mailserver.login_throttle import LoginThrottle
from mailserver.logs import emit
from mailserver.metrics import Metrics
from mailserver.worker_link import TO_PRIMARY_FD, Lines, failure_line

WORKER_ENV = "MAILSERVER_WORKER_SOCKETS"
PRIMARY_ENV = "MAILSERVER_PRIMARY_PID"
INDEX_ENV = "MAILSERVER_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1
_RESPAWN_DELAY = 1.0
# A worker's output line longer than this is passed on in pieces.
_MAX_LINE = 64 * 1024


def shared_address(endpoint) -> tuple[int, str, int, int] | None:
    """
    C{(family, host, port, backlog)} of a TCP endpoint, or C{None} for
    endpoint types that cannot be shared (read from the endpoint's private
    attributes: Twisted offers no public way).
    """
    if isinstance(endpoint, TCP6ServerEndpoint):
        return socket.AF_INET6, endpoint._interface or "::", endpoint._port, endpoint._backlog
    if isinstance(endpoint, TCP4ServerEndpoint):
        return socket.AF_INET, endpoint._interface or "0.0.0.0", endpoint._port, endpoint._backlog
    return None


def reuseport_socket(family: int, host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def inherited_sockets() -> list[tuple[int, int]] | None:
    """
    In a worker: C{(file descriptor, address family)} of each listening
    socket the primary bound for it, in listener order; C{None} in the
    primary.
    """
    value = os.environ.get(WORKER_ENV)
    if value is None:
        return None
    return [(int(fd), int(family)) for fd, family in json.loads(value)]


def process_index() -> int:
    """
    Which of the server's processes this is: 0 for the primary, 1 to N-1
    for the workers (each enforces its share of the per-server limits).
    """
    return int(os.environ.get(INDEX_ENV, "0"))


def follow_primary() -> None:
    """
    In a worker: be sent SIGTERM when the primary dies, however it dies
    (Linux C{PR_SET_PDEATHSIG}), so a primary killed with C{kill -9} leaves
    no worker behind serving its ports and holding its files; a worker
    stopped that way still finishes the transactions it has begun.
    """
    primary = os.environ.get(PRIMARY_ENV)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the worker outlives a crashed primary
    if primary is not None and os.getppid() != int(primary):
        os.kill(os.getpid(), signal.SIGTERM)  # the primary died before we asked


def worker_argv() -> list[str]:
    """
    This process's twistd command line, for a worker: in the foreground,
    without a pid file of its own, and without C{--uid}/C{--gid} (it starts
    as the user the primary has become).
    """
    argv = list(sys.argv)
    cleaned = [argv[0]]
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--pidfile", "--logfile", "-l", "--uid", "-u", "--gid", "-g"):
            skip = True
            continue
        if arg.startswith(("--pidfile=", "--logfile=", "--uid=", "--gid=")) or arg in (
            "-n", "--nodaemon"
        ):
            continue
        cleaned.append(arg)
    return [sys.executable, cleaned[0], "--nodaemon", "--pidfile=", *cleaned[1:]]


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()
        self.pid: int | None = None
        self.metrics: dict = {}  # its latest snapshot
        self._lines = Lines()
        self._output: dict[int, bytes] = {}  # per output fd: a line not yet ended

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in (1, 2):
            self._print(childFD, data)
        elif childFD == TO_PRIMARY_FD:
            for kind, payload in self._lines.feed(data):
                if kind == "F":
                    self.pool._failed_in(self, payload)
                elif kind == "Q":
                    self.pool.on_queued()
                elif kind == "E":
                    self.pool.on_flush(payload)
                else:
                    self.metrics = payload

    def _print(self, childFD: int, data: bytes) -> None:
        """
        The worker's log lines into the primary's log, whole lines only, so
        two processes' lines never mix within one.
        """
        if self.pool.worker_output is None:
            return  # not ours to read: the worker has the primary's output
        text = self._output.pop(childFD, b"") + data
        end = text.rfind(b"\n") + 1
        if end == 0 and len(text) > _MAX_LINE:
            end = len(text)  # no line end in sight: as it is
        if end:
            self.pool.worker_output(text[:end])
        if end < len(text):
            self._output[childFD] = text[end:]

    def childConnectionLost(self, childFD: int) -> None:
        rest = self._output.pop(childFD, b"")
        if rest and self.pool.worker_output is not None:
            self.pool.worker_output(rest + b"\n")

    def tell(self, line: bytes) -> None:
        try:
            self.transport.writeToChild(0, line)
        except Exception:  # it is ending; processEnded follows
            pass

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.pool._ended(self)


class WorkerPool(Service):
    """
    Starts the worker processes once the primary is listening, restarts
    one that dies, passes SIGHUP on, and stops them all with the primary.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        count: int,
        listeners,
        login_throttle: LoginThrottle,
        metrics: Metrics,
        on_queued: Callable[[], object] = lambda: None,
        on_flush: Callable[[str], object] = lambda domain: None,
        on_ended: Callable[[int], defer.Deferred] = lambda pid: defer.succeed(None),
        start_after: defer.Deferred | None = None,
        worker_output: Callable[[bytes], object] | None = None,
    ) -> None:
        """
        @param listeners: the primary's listeners; those with a
            C{shared_address} are passed on, once bound.
        @param login_throttle: the primary's, told of the workers' failed
            logins; the workers are told of its own and of each other's.
        @param metrics: the primary's registry, which adds in the workers'.
        @param on_queued: called when a worker hands over a queued message
            (the relay scans its queue's news at once).
        @param on_flush: called with the domain a worker's client asked
            for by ETRN (the relay tries its queued mail now).
        @param on_ended: called with the process id of a worker that ended
            (the relay takes in what it left); the worker is started again
            once the Deferred it returns fires, so no new process with the
            same id writes meanwhile.
        @param start_after: the workers start once it fires (the relay's
            start-up read of the queue: what they queue after it is theirs).
        @param worker_output: takes the workers' standard output and error,
            whole lines, for the primary's log (twistd's C{--logfile}, which
            a worker does not open: two processes rotating one file would
            lose lines); without it they share the primary's, which a
            daemon has pointed at C{/dev/null}.
        """
        self._start_after = start_after
        self.worker_output = worker_output
        self.on_queued = on_queued
        self.on_flush = on_flush
        self._on_ended = on_ended
        self._reactor = reactor
        self._count = count
        self._listeners = listeners
        self._login_throttle = login_throttle
        self._metrics = metrics
        login_throttle.share_with(self._tell_workers)
        metrics.count_elsewhere(self._workers_metrics)
        self._sockets: dict[int, list[socket.socket]] = {}  # per worker index
        self._workers: dict[int, _Worker] = {}
        self._argv = worker_argv()

    def privilegedStartService(self) -> None:
        """
        Bind every worker's sockets now, while the process may still be
        root, on the addresses the primary's own listeners got (they bind
        before this service: they come first in the parent service).
        """
        super().privilegedStartService()
        addresses = [l.shared_address for l in self._listeners if l.shared_address]
        for index in range(1, self._count):
            self._sockets[index] = []
            for address in addresses:
                self._sockets[index].append(reuseport_socket(*address))

    def startService(self) -> None:
        super().startService()
        if not self._sockets and self._count > 1:  # started without the privileged step
            self.privilegedStartService()
        if self._start_after is None:
            self._spawn_all()
        else:
            self._start_after.addBoth(lambda result: (self._spawn_all(), result)[1])

    def _spawn_all(self) -> None:
        if self.running:
            for index in range(1, self._count):
                if index not in self._workers:
                    self._spawn(index)

    def _spawn(self, index: int) -> None:
        sockets = self._sockets[index]
        child_fds = {TO_PRIMARY_FD + 1 + k: s.fileno() for k, s in enumerate(sockets)}
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps(
            [[fd, s.family] for fd, s in zip(child_fds, sockets)]
        )
        env[PRIMARY_ENV] = str(os.getpid())
        env[INDEX_ENV] = str(index)
        worker = _Worker(self, index)
        process = self._reactor.spawnProcess(
            worker, self._argv[0], self._argv, env=env,
            childFDs={0: "w", **({1: "r", 2: "r"} if self.worker_output else {1: 1, 2: 2}),
                      TO_PRIMARY_FD: "r", **child_fds},
        )
        worker.pid = process.pid
        self._workers[index] = worker
        emit(self.log, LogLevel.info, "worker.started", "started a worker", index=index)

    def _failed_in(self, worker: _Worker, key: str) -> None:
        self._login_throttle.record(key)
        self._tell_workers(key, besides=worker)

    def _tell_workers(self, key: str, besides: _Worker | None = None) -> None:
        line = failure_line(key)
        if line is not None:
            for worker in list(self._workers.values()):
                if worker is not besides:
                    worker.tell(line)

    def _workers_metrics(self) -> list[dict]:
        return [worker.metrics for worker in self._workers.values()]

    def _ended(self, worker: _Worker) -> None:
        if self._workers.get(worker.index) is not worker:
            return
        del self._workers[worker.index]
        self._metrics.absorb(worker.metrics)
        left = self._on_ended(worker.pid) if worker.pid else defer.succeed(None)
        if self.running:
            emit(self.log, LogLevel.warn, "worker.ended", "a worker ended; starting it again",
                 index=worker.index)
            left.addBoth(lambda _: self._reactor.callLater(_RESPAWN_DELAY, self._respawn,
                                                           worker.index))

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._workers:
            self._spawn(index)

    def signal_all(self, signum: int) -> None:
        for worker in self._workers.values():
            try:
                worker.transport.signalProcess(signum)
            except Exception:  # already gone
                pass

    def stopService(self):
        super().stopService()
        ended = [worker.ended for worker in self._workers.values()]
        self.signal_all(signal.SIGTERM)
        return defer.DeferredList(ended).addCallback(self._close_sockets)

    def _close_sockets(self, _) -> None:
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        self._sockets.clear()
