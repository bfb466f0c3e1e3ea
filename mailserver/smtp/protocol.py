"""
The SMTP server's glue (RFC 5321): the C{Protocol} that does the I/O of one
session.

The session itself is L{SMTPSession}, a state machine whose handlers
return replies and effects and never touch the transport; the plumbing
every line protocol needs (lines, batching, flow control, timers, closing,
TLS) is a L{LineSession}, and password checks go through L{Logins}.  What is
left here is carrying out what the handlers ask for: answering, waiting,
starting TLS, checking a login, closing.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

import mailserver.smtp.replies as R
from mailserver.logs import emit, emit_failure
from mailserver.safe_text import printable
from mailserver.sasl import is_loopback
from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.grammar import GrammarError, parse_command
from mailserver.smtp.refusals import (
    AUTH_FAILED,
    CONNECTION_LIMIT,
    ERRORS,
    RATE,
    SHUTDOWN,
)
from mailserver.smtp.replies import Reply, reply
from mailserver.smtp.session import JUNK_COMMANDS, SMTPSession
from mailserver.smtp.state import Connection, State
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login
from mailserver.wire.login import REFUSED, BadCredentials, LoggedIn, Logins
from mailserver.wire.session import TOO_LONG, LineSession

# RFC 4954 4: a SASL response line may be up to 12288 octets.
_MAX_AUTH_LINE = 12288


class Admission(TypingProtocol):
    """
    What a session asks of its listener: to be counted in (or refused with
    a reply), and out again.
    """

    def admit(self, session: SMTPServer) -> Reply | None: ...

    def release(self, session: SMTPServer) -> None: ...


class SMTPServer(Protocol):
    """
    One SMTP connection.

    @ivar closed: fires once the connection is gone.
    """

    log = Logger()

    def __init__(self, dependencies: SMTPDependencies, admission: Admission) -> None:
        self._deps = dependencies
        self._admission = admission
        limits = dependencies.limits
        self._command_limit = limits.max_command_line
        self._data_timeout = limits.smtp_data_timeout
        self._data_rate = limits.min_data_rate
        self._logins: Logins | None = None
        self._lines: LineSession
        self.session: SMTPSession
        self._counted = False
        self._shutting_down = False
        self.client_address = ""
        self.closed: defer.Deferred = defer.Deferred()

    # Connection life.

    def connectionMade(self) -> None:
        deps = self._deps
        transport = self.transport
        limits = deps.limits
        self._lines = LineSession(
            transport,
            deps.clock,
            on_input=self._input,
            on_timeout=self._timed_out,
            on_settled=self._close_if_shutting_down,
            line_timeout=limits.smtp_command_timeout,
            max_errors=limits.max_errors,
            max_junk=limits.max_junk_commands,
        )
        peer = transport.getPeer()
        self.client_address = getattr(peer, "host", "") or "127.0.0.1"
        self.session = SMTPSession(
            deps,
            Connection(
                address=self.client_address,
                port=getattr(peer, "port", 0),
                loopback=is_loopback(peer),
                describe_tls=self._tls_description,
                tls_parameters=self._tls_parameters,
                unread=self._lines.unread,
            ),
            tls=deps.implicit_tls or ISSLTransport.providedBy(transport),
        )
        refusal = self._admission.admit(self)
        if refusal is not None:
            reason = SHUTDOWN if refusal.enhanced == "4.3.2" else CONNECTION_LIMIT
            self._answer(self.session.refuse("CONNECT", refusal, reason))
            self._close()
            return
        self._counted = True
        deps.metrics.smtp_connections_total.inc(role=deps.metrics_role)
        deps.metrics.smtp_connections_active.inc(role=deps.metrics_role)
        self._lines.start()
        self._perform(self.session.greet())
        self._lines.flush()

    def connectionLost(self, reason: Failure = None) -> None:
        self._lines.lost()
        self.session.end()
        if self._counted:
            self._deps.metrics.smtp_connections_active.dec(role=self._deps.metrics_role)
        self._admission.release(self)
        self.closed.callback(None)

    def shut_down(self) -> None:
        """
        The server is stopping: say 421 now, or after the running message
        transfer has been answered (RFC 5321 3.8).
        """
        self._shutting_down = True
        self._close_if_shutting_down()

    def _close_if_shutting_down(self) -> None:
        lines = self._lines
        if (
            self._shutting_down
            and not lines.closed
            and not lines.waiting
            and self.session.between_messages()
        ):
            self._answer(reply(421, "4.3.2", f"{self._deps.hostname} Service shutting down"))
            self._close()

    def _close(self) -> None:
        self._lines.close()
        self.session.close()

    def _timed_out(self) -> None:
        session = self.session
        emit(self.log, LogLevel.info, "smtp.timeout", "timed out", client=self.client_address,
             helo=printable(session.helo or ""), user=printable(session.account or ""),
             state=session.state.label,
             id=session.transaction.id if session.transaction is not None else "")
        self._answer(reply(421, "4.4.2", f"{self._deps.hostname} Error: timeout exceeded"))
        self._close()

    # Input.

    def dataReceived(self, data: bytes) -> None:
        lines = self._lines
        if lines.closed:
            return
        if self.session.state.in_message:
            # Message text earns the client a second per min_data_rate
            # octets; a trickle of it does not hold the session for ever.
            if self._data_rate:
                lines.extend_idle(len(data) / self._data_rate)
            else:
                lines.restart_idle(self._data_timeout)
        lines.feed(data)
        lines.process()

    def _input(self) -> bool:
        """
        Hand what arrived to the session: message text, or lines until the
        state leaves command mode.  Returns C{False} when only an incomplete
        line is left.
        """
        session = self.session
        state = session.state
        if state is State.DATA:
            self._read_data()
            return True
        if state is State.BDAT:
            self._read_chunk()
            return True
        lines = self._lines
        line: bytes | object | None = b""
        took = False
        while state.reads_lines:
            line = lines.take_line(_MAX_AUTH_LINE if state is State.AUTH else self._command_limit)
            if line is None:
                break
            took = True
            if line is TOO_LONG:
                self._answer(session.line_too_long())
            elif state is State.AUTH:
                self._perform(session.sasl_response(line))
            else:
                self._command(line)
            state = session.state
        if took and state.reads_lines:
            lines.restart_idle()  # a whole command arrived in time
        return line is not None

    def _command(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except GrammarError as e:
            self._answer(reply(500, "5.5.2", str(e)))
            return
        if command.verb in JUNK_COMMANDS and self._lines.note_junk():
            self._too_many_errors()
            return
        result = self.session.command(command)
        if result.__class__ is Reply:
            self._answer(result)
        else:
            self._perform(result)
        if self.session.state.in_message:
            self._lines.restart_idle(self._data_timeout)

    def _read_data(self) -> None:
        session = self.session
        rest = session.message_text(self._lines.take_all())
        if rest is not None:
            self._lines.unread_bytes(rest)
            self._lines.restart_idle()
            self._perform(session.end_of_message())

    def _read_chunk(self) -> None:
        session = self.session
        chunk = session.chunk
        session.chunk_text(self._lines.take(chunk.remaining))
        if chunk.remaining == 0:
            self._lines.restart_idle()
            self._perform(session.end_of_chunk())

    # Carrying out the session's results.

    def _perform(self, result) -> None:
        if result.__class__ is Reply:
            self._answer(result)
        elif result is None:
            return
        elif isinstance(result, tuple):
            for item in result:
                self._perform(item)
        elif isinstance(result, defer.Deferred):
            self._lines.wait(result, self._perform_outcome)
        elif isinstance(result, Await):
            self._lines.wait(result.deferred, lambda outcome: self._perform(result.then(outcome)))
        elif result is CLOSE:
            self._close()
        elif result is START_TLS:
            self._lines.start_tls(self._deps.tls_options)
        elif isinstance(result, Login):
            self._login(result)
        elif isinstance(result, Reply):  # a plugin's Reject
            self._answer(result)
        else:
            raise TypeError(f"not a session result: {result!r}")

    def _perform_outcome(self, result) -> None:
        if isinstance(result, Failure):
            emit_failure(self.log, "smtp.handler_failed", "a command's handler failed", result,
                         client=self.client_address)
            result = R.TEMPORARY_FAILURE
        self._perform(result)

    def _answer(self, answer: Reply) -> None:
        lines = self._lines
        if lines.closed and answer.code != 421:
            return
        lines.send(answer.render())
        if answer.code >= 500 and lines.note_error() and not lines.closed:
            self._too_many_errors()

    def _too_many_errors(self) -> None:
        refusal = reply(421, "4.7.0", f"{self._deps.hostname} Error: too many errors")
        self._answer(self.session.refuse("-", refusal, ERRORS, errors=self._lines.errors))
        self._close()

    # Logins (RFC 4954).

    def _login(self, login: Login) -> None:
        user = login.username.decode("utf-8", "replace")
        if self._logins is None:
            deps = self._deps
            self._logins = Logins(
                deps.portal, deps.login_throttle, max_failures=deps.limits.max_auth_failures
            )
        checking = self._logins.attempt(
            self.client_address, login.username, login.password, gone=lambda: self._lines.closed
        )
        if checking is REFUSED:
            # Too many failed logins from there: refused unchecked.
            self._answer(self.session.refuse("AUTH", R.LOGINS_REFUSED, RATE,
                                             event="smtp.auth_throttled", user=printable(user)))
            return
        self._lines.wait(checking, partial(self._checked, user))

    def _checked(self, user: str, outcome) -> None:
        if isinstance(outcome, LoggedIn):
            self._perform(self.session.logged_in(outcome.avatar.address, outcome.logout))
            return
        if not isinstance(outcome, BadCredentials):
            emit_failure(self.log, "smtp.auth_error", "checking a login failed", outcome.failure,
                         client=self.client_address)
            self._answer(R.AUTH_UNAVAILABLE)
            return
        self.session.refuse("AUTH", R.BAD_CREDENTIALS, AUTH_FAILED, event="smtp.auth_failed",
                            user=printable(user), failures=outcome.failures)
        if outcome.final:
            self._answer(R.BAD_CREDENTIALS)
            hostname = self._deps.hostname
            self._answer(reply(421, "4.7.0", f"{hostname} Error: too many failed logins"))
            self._close()
            return
        # Each failure from this address waits longer before the answer.
        self._lines.pause(outcome.delay, lambda _: self._answer(R.BAD_CREDENTIALS))

    # Connection facts.

    def _tls_parameters(self) -> tuple[str | None, str | None]:
        """
        The TLS protocol and cipher names, C{(None, None)} when unknown.
        """
        handle = getattr(self.transport, "getHandle", lambda: None)()
        version = getattr(handle, "get_protocol_version_name", None)
        cipher = getattr(handle, "get_cipher_name", None)
        if version is None or cipher is None:
            return None, None
        return version(), cipher()

    def _tls_description(self) -> str | None:
        version, cipher = self._tls_parameters()
        if version is None:
            return "using TLS"
        return f"using {version} with cipher {cipher}"
