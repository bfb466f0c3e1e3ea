"""
What the worker processes and the primary tell each other (see
L{mailserver.workers}), one line per message:

 - C{F <client key>}: a failed login from that client (a
   L{mailserver.login_throttle.client_key}), so every process's login
   throttle counts it.  Workers send these to the primary, the primary to
   every other process.
 - C{M <JSON>}: a worker's metric counts (L{mailserver.metrics.Metrics.snapshot}),
   sent to the primary about once a second when they changed, so its
   C{/metrics} counts every process.
 - C{Q <queue id>}: a worker hands the primary a queued message it sent
   once and could not finish (L{mailserver.relay.worker_runner}): the
   primary takes it in at once, not at its next scan of the queue folder
   (the worker's mark in C{incoming/} stays the durable way, should the
   line be lost).
 - C{E <domain>}: a client asked a worker for ETRN (RFC 1985): the primary,
   which keeps the queue, tries that domain's queued mail now.

A worker writes on L{TO_PRIMARY_FD} and reads its standard input.  Lines
that do not parse are skipped: the pipes join our own processes, but a bad
line must not take a process down.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from mailserver.login_throttle import LoginThrottle
from mailserver.logs import emit
from mailserver.metrics import Metrics

# A worker's end of the pipe to the primary.
TO_PRIMARY_FD = 3
METRICS_INTERVAL = 1.0
# What a client key of an IP address looks like; other keys stay local.
_SHAREABLE_KEY = re.compile(rb"[0-9A-Fa-f.:/]{1,64}")
_MAX_LINE = 1 << 20
_QUEUE_ID = re.compile(rb"[0-9A-Za-z]{1,64}")
# A domain as ETRN took it (checked there; UTF-8 under SMTPUTF8).
_DOMAIN = re.compile(rb"[^\x00-\x20\x7f]{1,255}")
# What a line of each kind carries, checked when it is made and when read
# (C{M} carries JSON).
_PAYLOADS = {b"F": _SHAREABLE_KEY, b"Q": _QUEUE_ID, b"E": _DOMAIN}


def _line(kind: bytes, text: str) -> bytes | None:
    encoded = text.encode("utf-8", "replace")
    return kind + b" " + encoded + b"\n" if _PAYLOADS[kind].fullmatch(encoded) else None


def failure_line(key: str) -> bytes | None:
    """
    The line that tells another process of a failed login from C{key}, or
    C{None} for a key that is not an IP address's.
    """
    return _line(b"F", key)


def metrics_line(snapshot: dict[str, Any]) -> bytes:
    return b"M " + json.dumps(snapshot, separators=(",", ":")).encode("ascii") + b"\n"


def queued_line(queue_id: str) -> bytes | None:
    """
    The line that tells the primary of a message queued for the relay, or
    C{None} for what is no queue id.
    """
    return _line(b"Q", queue_id)


def flush_line(domain: str) -> bytes | None:
    """
    The line that asks the primary to try a domain's queued mail now (ETRN),
    or C{None} for what cannot be a domain.
    """
    return _line(b"E", domain)


class Lines:
    """
    The messages in a stream of lines, however it is cut into reads: each
    is C{("F", client key)}, C{("M", snapshot dict)}, C{("Q", queue id)} or
    C{("E", domain)}.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> Iterator[tuple[str, Any]]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > _MAX_LINE:
            self._pending = b""
        for line in lines:
            kind, _, payload = line.partition(b" ")
            pattern = _PAYLOADS.get(kind)
            if pattern is not None:
                if pattern.fullmatch(payload):
                    try:
                        yield kind.decode(), payload.decode("utf-8")
                    except UnicodeDecodeError:
                        continue
            elif kind == b"M":
                try:
                    snapshot = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(snapshot, dict):
                    yield "M", snapshot


class _FromPrimary(Protocol):
    def __init__(self, login_throttle: LoginThrottle) -> None:
        self._login_throttle = login_throttle
        self._lines = Lines()

    def dataReceived(self, data: bytes) -> None:
        for kind, payload in self._lines.feed(data):
            if kind == "F":
                self._login_throttle.record(payload)


class PrimaryLink(Service):
    """
    In a worker: counts the failed logins the primary reports, and reports
    its own failed logins, its metrics and the queued messages it hands
    over to the primary.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        login_throttle: LoginThrottle,
        metrics: Metrics,
        open_stdio: Callable[..., Any] = StandardIO,
        to_primary_fd: int = TO_PRIMARY_FD,
    ) -> None:
        self._reactor = reactor
        self._login_throttle = login_throttle
        self._metrics = metrics
        self._open_stdio = open_stdio
        self._to_primary_fd = to_primary_fd
        self._protocol: _FromPrimary | None = None
        self._reporting: LoopingCall | None = None
        self._last_report = b""

    def startService(self) -> None:
        super().startService()
        try:
            os.fstat(self._to_primary_fd)
        except OSError:
            emit(self.log, LogLevel.warn, "worker.no_pipe",
                 "no pipe to the primary: failed logins and metrics stay in this process")
            return
        self._protocol = _FromPrimary(self._login_throttle)
        self._open_stdio(self._protocol, stdin=0, stdout=self._to_primary_fd, reactor=self._reactor)
        self._login_throttle.share_with(self._tell_failure)
        self._reporting = LoopingCall(self.report_metrics)
        self._reporting.clock = self._reactor
        self._reporting.start(METRICS_INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._reporting is not None and self._reporting.running:
            self._reporting.stop()
        self.report_metrics()  # the counts up to the end

    def _write(self, line: bytes | None) -> None:
        if line is not None and self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.write(line)

    def _tell_failure(self, key: str) -> None:
        self._write(failure_line(key))

    def tell_queued(self, queue_id: str) -> None:
        """
        Hand the primary a queued message (its mark is in C{incoming/}
        already), on the reactor thread.
        """
        self._write(queued_line(queue_id))

    def tell_flush(self, domain: str) -> None:
        """
        Ask the primary to try C{domain}'s queued mail now (ETRN).
        """
        self._write(flush_line(domain))

    def report_metrics(self) -> None:
        """
        Send this process's metrics, unless they are what was sent last.
        """
        line = metrics_line(self._metrics.snapshot())
        if line != self._last_report:
            self._last_report = line
            self._write(line)
