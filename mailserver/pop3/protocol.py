"""
The POP3 server's glue: the C{Protocol} that does the I/O of one session.

The session itself is L{POP3Session}, a state machine whose handlers
return responses and effects and never touch the transport; the plumbing
every line protocol needs (lines, batching, flow control, timers, closing,
TLS) is a L{LineSession}, password checks go through L{Logins}, and RETR and
TOP are answered by a L{Retriever}.  What is left here is carrying out what
the handlers ask for.

Written on C{Protocol} rather than C{twisted.mail.pop3}: a turn's responses
go out in one write on a C{TCP_NODELAY} socket (the stock server's several
small writes meet Nagle and delayed ACK, 40 ms a command), and RETR streams
a large message through a producer instead of holding it.

Commands are handled in order: while a login is being checked or a large
message is being sent, later (pipelined) lines wait and the transport stops
reading; while a turn's messages are read, later lines wait.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol as TypingProtocol

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.logs import emit, emit_failure
from mailserver.pop3 import responses as R
from mailserver.pop3.dependencies import POP3Dependencies
from mailserver.pop3.responses import Response
from mailserver.pop3.retrieval import Retrieve, Retriever
from mailserver.pop3.session import (
    BATCHED_COMMANDS,
    POP3Session,
    is_valid_user_name,
    parse_command,
)
from mailserver.pop3.state import Connection, State
from mailserver.safe_text import printable
from mailserver.sasl import is_loopback
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login
from mailserver.wire.flow import BUSY
from mailserver.wire.login import REFUSED, BadCredentials, LoggedIn, Logins
from mailserver.wire.session import TOO_LONG, LineSession

# Responses held back for one send while a turn's commands are handled,
# past which they are sent at once.
_FLUSH_OCTETS = 64 * 1024
# Commands read ahead while the client does not read our responses, past
# which the socket is not read.
_MAX_PENDING_LINES = 1000


class Admission(TypingProtocol):
    """
    What a session asks of its listener: to be counted in (or refused with
    a response), and out again.
    """

    def admit(self, session: POP3Server) -> Response | None: ...

    def release(self, session: POP3Server) -> None: ...


class POP3Server(Protocol):
    """
    One POP3 connection.
    """

    log = Logger(namespace="mailserver.pop3")

    def __init__(self, dependencies: POP3Dependencies, admission: Admission) -> None:
        self._deps = dependencies
        self._admission = admission
        self._admitted = False
        # The configured limit leaves out the CRLF; the line session's counts it.
        self._line_limit = dependencies.limits.max_command_line + 2
        self._logins: Logins | None = None
        self._lines: LineSession
        self._retriever: Retriever
        self.session: POP3Session

    # Connection life.

    def connectionMade(self) -> None:
        deps = self._deps
        transport = self.transport
        self._lines = lines = LineSession(
            transport,
            deps.clock,
            on_input=self._input,
            on_timeout=self._timed_out,
            line_timeout=deps.limits.pop3_idle_timeout,
            max_errors=deps.limits.max_errors,
            flush_octets=_FLUSH_OCTETS,
            max_pending_lines=_MAX_PENDING_LINES,
            refuse_long_lines_at_end=True,
        )
        self._retriever = Retriever(lines, deps.run_blocking, self._perform)
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        connection = Connection(
            address=host or "",
            client=f"{host}:{peer.port}" if host is not None else str(peer),
            loopback=is_loopback(peer),
        )
        self.session = POP3Session(
            deps, connection, tls=deps.implicit_tls or ISSLTransport.providedBy(transport)
        )
        refusal = self._admission.admit(self)
        if refusal is not None:
            self._answer(refusal)
            self._close()
            return
        self._admitted = True
        lines.start()
        self._answer(self.session.greet())
        lines.flush()

    def connectionLost(self, reason: Failure = None) -> None:
        self._lines.lost()
        self._retriever.stop()
        if self._admitted:  # a refused one had no session to end
            self.session.end()
        self._admission.release(self)

    @property
    def client_address(self) -> str:
        return self.session.connection.address

    def _close(self) -> None:
        self._lines.close()
        self.session.close()

    def _timed_out(self) -> None:
        session = self.session
        emit(self.log, LogLevel.info, "pop3.timeout", "disconnected for inactivity",
             user=printable(session.account or "-"), client=session.connection.client)
        self._answer(R.TIMEOUT)
        self._close()

    # Input.

    def dataReceived(self, data: bytes) -> None:
        lines = self._lines
        if lines.closed:
            return
        if b"\n" in data and not self._retriever.streaming:
            # Only whole lines count as activity: a client trickling in a
            # byte at a time still meets the idle timeout.
            lines.restart_idle()
        lines.feed(data)
        lines.process()

    def _input(self) -> bool:
        """
        Handle every complete line there is (or this turn's share); the
        turn's messages are then read and sent together.
        """
        lines = self._lines
        retriever = self._retriever
        while True:
            line = lines.take_line(self._line_limit)
            if line is None:
                break
            self._handle(line)
            if retriever.full:
                retriever.send_queued(_go_on)
        if retriever.queued:
            retriever.send_queued(_go_on)
        return False

    def _handle(self, line) -> None:
        session = self.session
        retriever = self._retriever
        if line is TOO_LONG:
            if retriever.queued:
                retriever.send_queued(lambda _: self._handle(line))
                return
            self._perform(session.line_too_long())
        elif session.state is State.SASL:
            self._perform(session.sasl_response(line))
        else:
            command = parse_command(line)
            if retriever.queued and command.verb not in BATCHED_COMMANDS:
                # What it does may depend on how the queued ones went.
                retriever.send_queued(lambda _: self._handle(line))
                return
            result = session.command(command)
            if result.__class__ is Response:
                self._answer(result)
            else:
                self._perform(result)

    # Carrying out the session's results.

    def _perform(self, result) -> None:
        if result.__class__ is Response:
            self._answer(result)
        elif result is None:
            return
        elif result.__class__ is Retrieve:
            self._retriever.add(result)
        elif isinstance(result, tuple):
            for item in result:
                self._perform(item)
        elif isinstance(result, Await):
            self._wait(result.deferred, lambda outcome: self._perform(result.then(outcome)))
        elif result is CLOSE:
            self._close()
        elif result is START_TLS:
            self._lines.start_tls(self._deps.tls_options)
        elif isinstance(result, Login):
            self._login(result)
        else:
            raise TypeError(f"not a session result: {result!r}")

    def _answer(self, response: Response) -> None:
        if self._retriever.queued:
            self._retriever.add(response)  # after the messages asked for before
        elif not self._lines.closed:
            self._lines.send(response.render())

    def _wait(self, waiting: defer.Deferred, then) -> None:
        """
        Handle no more commands, and read none, until C{waiting} fires.
        """
        lines = self._lines
        lines.reads.hold(BUSY)
        lines.wait(waiting, partial(self._waited, then))

    def _pause(self, seconds: float, then) -> None:
        lines = self._lines
        lines.reads.hold(BUSY)
        lines.pause(seconds, partial(self._waited, then))

    def _waited(self, then, outcome) -> None:
        then(outcome)
        if not self._lines.waiting:
            self._lines.reads.release(BUSY)

    # Logins.

    def _login(self, login: Login) -> None:
        user = login.username.decode("utf-8", "replace")
        session = self.session
        if self._logins is None:
            deps = self._deps
            self._logins = Logins(
                _ValidNamesOnly(deps.portal),
                deps.login_throttle,
                max_failures=deps.limits.max_auth_failures,
            )
        checking = self._logins.attempt(
            session.connection.address, login.username, login.password,
            gone=lambda: self._lines.closed,
        )
        if checking is REFUSED:
            emit(self.log, LogLevel.warn, "pop3.auth_throttled",
                 "login refused unchecked: too many failed logins from there",
                 user=printable(user), client=session.connection.client)
            self._answer(R.LOGINS_REFUSED)
            return
        self._wait(checking, partial(self._checked, user))

    def _checked(self, user: str, outcome) -> None:
        if isinstance(outcome, LoggedIn):
            self._perform(self.session.logged_in(outcome.avatar.address, outcome.logout))
            return
        if not isinstance(outcome, BadCredentials):
            emit_failure(self.log, "pop3.auth_error", "login check failed", outcome.failure,
                         client=self.session.connection.client)
            self._answer(R.AUTH_UNAVAILABLE)
            return
        self._deps.metrics.pop3_login_failures_total.inc()
        emit(self.log, LogLevel.warn, "pop3.auth_failed", "authentication failed",
             user=printable(user), client=self.session.connection.client,
             failures=outcome.failures)
        # Each failure from this address waits longer before the answer.
        self._pause(outcome.delay, partial(self._answer_failed_login, outcome.final))

    def _answer_failed_login(self, final: bool, _) -> None:
        self._answer(R.AUTH_FAILED)
        if final:
            self._close()


def _go_on(_) -> None:
    """
    Nothing waits on a turn's messages but the next commands.
    """


class _ValidNamesOnly:
    """
    A portal in front of another that refuses, without asking it, a name no
    account has (one that could look like a path): a failed login all the
    same, counted and answered late.
    """

    def __init__(self, portal) -> None:
        self._portal = portal

    def login(self, credentials, mind, *interfaces):
        if not is_valid_user_name(credentials.username):
            return defer.fail(UnauthorizedLogin())
        return self._portal.login(credentials, mind, *interfaces)
