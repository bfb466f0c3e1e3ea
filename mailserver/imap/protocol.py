"""
The IMAP server's glue: the C{Protocol} that does the I/O of one session.

The session itself is L{IMAPSession}, a state machine whose handlers return
responses and effects and never touch the transport; the plumbing every
line protocol needs (lines, batching, flow control, timers, closing, TLS)
is a L{LineSession}, password checks go through L{Logins}, FETCH is
answered by a L{Fetcher}.  What is left here is gathering a command's
lines and literals, and carrying out what the handlers ask for: answering,
waiting, starting TLS, checking a login, pushing changes during IDLE,
closing.

A command with literals arrives as lines, each ending with C{{n}} (the
client waits for our C{+}, RFC 3501 7.5) or C{{n+}} (LITERAL+, RFC 7888:
it does not), each followed by its n octets.  Only APPEND may send more
than L{MAX_COMMAND} octets in all (up to the message size limit); a
literal that large is kept in memory up to L{SPILL} octets while the
process's memory budget allows, else in an anonymous file in the spool
(L{mailserver.memory_budget.SpooledBuffer}).
"""

from __future__ import annotations

from functools import partial

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.imap import responses as R
from mailserver.imap.dependencies import IMAPDependencies
from mailserver.imap.fetcher import Fetcher, FetchRequest
from mailserver.imap.grammar import Literal, ParseError, literal_at_end, parse, peek_tag_and_name
from mailserver.imap.session import IMAPSession
from mailserver.imap.state import Connection, State
from mailserver.logs import emit, emit_failure
from mailserver.memory_budget import SpooledBuffer
from mailserver.safe_text import printable
from mailserver.sasl import is_loopback
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login
from mailserver.wire.flow import BUSY
from mailserver.wire.login import REFUSED, BadCredentials, LoggedIn, Logins
from mailserver.wire.session import TOO_LONG, LineSession

# A command line, and all of a command but APPEND's message, at most.
MAX_LINE = 64 * 1024
MAX_COMMAND = 64 * 1024
# Larger literals are kept in memory (under the memory budget) up to
# this size while they arrive.
SPILL = 1024 * 1024
# FETCH commands answered together (their files read by one job).
FETCHES_PER_BATCH = 32
_BATCHED = frozenset({"FETCH", "UID FETCH"})
# Seconds a client that has not logged in gets for each line (as
# Dovecot's 3 minutes): limits.imap_idle_timeout's 30 minutes (RFC 3501
# 5.4) are for logged-in sessions, and would let idle strangers hold the
# connection caps.
LOGIN_IDLE_TIMEOUT = 180.0
# Seconds between the "still here" lines sent during IDLE (NAT boxes drop
# connections silent for a few minutes).
IDLE_KEEPALIVE = 120.0


class _Reading:
    """
    A literal being read.  One no larger than a whole command may be
    (L{MAX_COMMAND}) is gathered as bytes, as a command line is; a larger
    one (APPEND's message) goes into a L{SpooledBuffer} and is handed on
    as a L{Literal}.

    @ivar failed: the spool file could not be written (the rest is
        discarded; the command is refused).
    """

    def __init__(self, size: int, deps: IMAPDependencies, discard: bool) -> None:
        self.size = size
        self.left = size
        self.discard = discard
        self.failed = False
        self._memory = bytearray()
        self._buffer = None
        if size > MAX_COMMAND and not discard:
            spill_at = SPILL if size <= SPILL else 0  # straight to the file
            self._buffer = SpooledBuffer(deps.budget, deps.open_spill, spill_size=spill_at)

    def take(self, data: bytes) -> None:
        self.left -= len(data)
        if self.discard:
            return
        if self._buffer is None:
            self._memory += data
            return
        try:
            self._buffer.write(data)
        except OSError as e:
            emit(IMAPServer.log, LogLevel.error, "imap.spool_failed", "cannot spool a literal",
                 problem=str(e))
            self.abandon()
            self.discard = self.failed = True

    def value(self):
        if self._buffer is not None:
            return Literal(self._buffer, self.size)
        return bytes(self._memory)

    def abandon(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class IMAPServer(Protocol):
    """
    One IMAP connection.

    @ivar closed: fires once the connection is gone.
    """

    log = Logger(namespace="mailserver.imap")

    def __init__(self, dependencies: IMAPDependencies, admission) -> None:
        self._deps = dependencies
        self._admission = admission
        self._logins: Logins | None = None
        self._lines: LineSession
        self._fetcher: Fetcher
        self.session: IMAPSession
        self._pieces: list = []
        self._fetches: list[FetchRequest] = []
        self._octets = 0
        self._reading: _Reading | None = None
        self._reading_tag = "*"
        self._refusal = None
        self._keepalive = None
        self._counted = False
        self.client_address = ""
        self.closed: defer.Deferred = defer.Deferred()

    # Connection life.

    def connectionMade(self) -> None:
        deps = self._deps
        transport = self.transport
        self._lines = LineSession(
            transport,
            deps.clock,
            on_input=self._input,
            on_timeout=self._timed_out,
            line_timeout=min(LOGIN_IDLE_TIMEOUT, deps.limits.imap_idle_timeout),
            max_errors=deps.limits.max_errors,
        )
        self._fetcher = Fetcher(self._lines, deps.run_blocking, deps.structures)
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        self.client_address = host or "127.0.0.1"
        connection = Connection(
            address=self.client_address,
            client=f"{host}:{peer.port}" if host is not None else str(peer),
            loopback=is_loopback(peer),
        )
        self.session = IMAPSession(
            deps, connection, tls=deps.implicit_tls or ISSLTransport.providedBy(transport)
        )
        refusal = self._admission.admit(self)
        if refusal is not None:
            self._lines.send(R.untagged(f"BYE {refusal}").render())
            self._close()
            return
        self._counted = True
        self._lines.start()
        self._send(self.session.greet())
        self._lines.flush()

    def connectionLost(self, reason: Failure = None) -> None:
        self._lines.lost()
        self._stop_keepalive()
        if self._reading is not None:
            self._reading.abandon()
        self._abandon_pieces()
        if self._counted:
            emit(self.log, LogLevel.info, "imap.session", "session ended",
                 user=self.session.address or "-", client=self.session.connection.client)
        self.session.end()
        self._admission.release(self)
        self.closed.callback(None)

    def shut_down(self) -> None:
        """
        The server is stopping (RFC 3501 7.1.5: BYE).
        """
        if not self._lines.closed:
            self._send(R.untagged("BYE Server shutting down."))
            self._close()

    def _close(self) -> None:
        self._stop_keepalive()
        self._lines.close()
        self.session.close()

    def _timed_out(self) -> None:
        emit(self.log, LogLevel.info, "imap.timeout", "disconnected for inactivity",
             user=self.session.address or "-", client=self.session.connection.client)
        self._send(R.untagged("BYE Disconnected for inactivity."))
        self._close()

    # Input.

    def dataReceived(self, data: bytes) -> None:
        lines = self._lines
        if lines.closed:
            return
        if self._reading is not None or b"\n" in data:
            lines.restart_idle()
        lines.feed(data)
        lines.process()

    def _input(self) -> bool:
        lines = self._lines
        while True:
            if self._reading is not None:
                if not self._read_literal():
                    return False
                continue
            line = lines.take_line(MAX_LINE)
            if line is None:
                if self._fetches and not lines.waiting and not lines.closed:
                    self._run_fetches()  # the end of the turn
                return False
            if line is TOO_LONG:
                self._abandon_pieces()
                answer = self.session.line_too_long()
                if self._fetches:
                    self._run_fetches(then=lambda: self._answer(answer))
                else:
                    self._answer(answer)
                continue
            state = self.session.state
            if state is State.SASL:
                self._perform(self.session.sasl_response(line))
            elif state is State.IDLE:
                self._stop_keepalive()
                self._perform(self.session.idle_line(line))
            elif state.reads_commands:
                self._command_line(line)

    def _command_line(self, line: bytes) -> None:
        self._pieces.append(line)
        self._octets += len(line)
        spec = literal_at_end(line)
        if spec is None:
            pieces, self._pieces, self._octets = self._pieces, [], 0
            if self._refusal is not None:
                refusal, self._refusal = self._refusal, None
                self._abandon(pieces)
                self._answer(refusal)
                return
            self._command(pieces)
            return
        tag, name = peek_tag_and_name(self._pieces[0])
        # Only a logged-in APPEND may bring a message; before login no
        # command needs more than MAX_COMMAND, and a larger "+ OK" would
        # let anyone make the server store megabytes.
        logged_in = self.session.state in (State.AUTHENTICATED, State.SELECTED)
        limit = self._deps.limits.max_message_size if name == "APPEND" and logged_in else MAX_COMMAND
        self._octets += spec.size
        too_large = self._octets > limit + len(line)
        if too_large and spec.synchronizing:
            # The client sends nothing more of this command (RFC 7888 4).
            self._abandon_pieces()
            self._answer(R.no(tag or "*", "Literal too large.", "TOOBIG"))
            return
        if too_large and self._refusal is None:
            self._refusal = R.no(tag or "*", "Literal too large.", "TOOBIG")
        self._reading = _Reading(spec.size, self._deps, discard=self._refusal is not None)
        self._reading_tag = tag or "*"
        if spec.synchronizing:
            self._lines.send(R.Continuation("OK").render())
            self._lines.flush()

    def _read_literal(self) -> bool:
        reading = self._reading
        if reading.left:
            data = self._lines.take(reading.left)
            if not data:
                return False
            reading.take(data)
            if reading.left:
                return False
        self._reading = None
        if reading.failed and self._refusal is None:
            self._refusal = R.no(self._reading_tag, "Cannot take the message now.", "UNAVAILABLE")
        self._pieces.append(reading.value())
        return True

    def _abandon_pieces(self) -> None:
        pieces, self._pieces, self._octets = self._pieces, [], 0
        self._abandon(pieces)

    @staticmethod
    def _abandon(pieces: list) -> None:
        for piece in pieces:
            if isinstance(piece, Literal):
                piece.close()

    def _command(self, pieces: list) -> None:
        try:
            command = parse(pieces)
        except ParseError as e:
            self._abandon(pieces)
            answer = self.session.parse_error(e)
            if self._fetches:
                self._run_fetches(then=lambda: self._answer(answer))
            else:
                self._answer(answer)
            return
        if self._fetches and command.name not in _BATCHED:
            # What it does may depend on how the queued FETCHes went.
            self._run_fetches(then=lambda: self._handle(command, pieces))
            return
        self._handle(command, pieces)

    def _handle(self, command, pieces: list) -> None:
        result = self.session.command(command)
        if command.name != "APPEND":
            self._abandon(pieces)  # APPEND closes its literal when stored
        self._perform(result)

    # Carrying out the session's results.

    def _perform(self, result) -> None:
        if result is None:
            return
        if isinstance(result, tuple):
            for item in result:
                self._perform(item)
        elif isinstance(result, (R.Tagged, R.Untagged, R.Continuation)):
            self._answer(result)
        elif isinstance(result, Await):
            self._wait(result.deferred, lambda outcome: self._perform(result.then(outcome)))
        elif isinstance(result, FetchRequest):
            # Answered at the end of the turn with the turn's other FETCHes.
            self._fetches.append(result)
            if len(self._fetches) >= FETCHES_PER_BATCH:
                self._run_fetches()
        elif result is CLOSE:
            self._close()
        elif result is START_TLS:
            self._lines.start_tls(self._deps.tls_options)
        elif isinstance(result, Login):
            self._login(result)
        else:
            raise TypeError(f"not a session result: {result!r}")

    def _run_fetches(self, then=None) -> None:
        """
        Answer the FETCHes queued this turn, then go on (with C{then}, the
        command that waited for them).
        """
        fetches, self._fetches = self._fetches, []

        def answered(outcome) -> None:
            if isinstance(outcome, Failure):
                self._unexpected(outcome)
            elif then is not None:
                then()

        self._wait(self._fetcher.run(fetches, self._perform), answered)

    def _answer(self, response) -> None:
        if isinstance(response, R.Continuation) and self.session.state is State.IDLE:
            self._idle_started()
        self._send(response)
        if isinstance(response, R.Tagged) and response.status == "BAD":
            if self._lines.note_error() and not self._lines.closed:
                self._send(R.untagged("BYE Too many invalid IMAP commands."))
                self._close()

    def _send(self, response) -> None:
        if not self._lines.closed:
            self._lines.send(response.render())

    def _wait(self, waiting: defer.Deferred, then) -> None:
        """
        Handle no more commands, and read none, until C{waiting} fires.
        """
        lines = self._lines
        lines.reads.hold(BUSY)
        lines.wait(waiting, partial(self._waited, then))

    def _waited(self, then, outcome) -> None:
        try:
            then(outcome)
        except Exception:
            self._unexpected(Failure())
        if not self._lines.waiting:
            self._lines.reads.release(BUSY)

    def _unexpected(self, failure: Failure) -> None:
        gone = self.session.selected_gone(failure)
        if gone is not None:
            self._perform(gone)
            return
        emit_failure(self.log, "imap.error", "session error", failure,
                     client=self.session.connection.client)
        self._send(R.untagged("BYE Internal error occurred."))
        self._close()

    # IDLE (RFC 2177).

    def _idle_started(self) -> None:
        view = self.session.view
        if view is not None:
            view.on_change = self._push
        self._keepalive = self._deps.clock.callLater(IDLE_KEEPALIVE, self._still_here)

    def _push(self) -> None:
        updates = self.session.idle_updates()
        if updates and not self._lines.closed:
            for update in updates:
                self._send(update)
            self._lines.flush()

    def _still_here(self) -> None:
        self._keepalive = None
        if self.session.state is State.IDLE and not self._lines.closed:
            self._send(self.session.idle_keepalive())
            self._lines.flush()
            self._keepalive = self._deps.clock.callLater(IDLE_KEEPALIVE, self._still_here)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        view = self.session.view
        if view is not None:
            view.on_change = None

    # Logins.

    def _login(self, login: Login) -> None:
        user = login.username.decode("utf-8", "replace")
        session = self.session
        if self._logins is None:
            deps = self._deps
            self._logins = Logins(
                deps.portal, deps.login_throttle, max_failures=deps.limits.max_auth_failures
            )
        checking = self._logins.attempt(
            session.connection.address, login.username, login.password,
            gone=lambda: self._lines.closed,
        )
        if checking is REFUSED:
            emit(self.log, LogLevel.warn, "imap.auth_throttled",
                 "login refused unchecked: too many failed logins from there",
                 user=printable(user), client=session.connection.client)
            self._answer(session.logins_refused())
            return
        self._wait(checking, partial(self._checked, user))

    def _checked(self, user: str, outcome) -> None:
        session = self.session
        if isinstance(outcome, LoggedIn):
            self._deps.metrics.imap_logins_total.inc()
            self._lines.set_line_timeout(self._deps.limits.imap_idle_timeout)
            self._perform(session.logged_in(outcome.avatar.address, outcome.logout))
            return
        if not isinstance(outcome, BadCredentials):
            emit_failure(self.log, "imap.auth_error", "login check failed", outcome.failure,
                         client=session.connection.client)
            self._answer(session.login_unavailable())
            return
        self._deps.metrics.imap_login_failures_total.inc()
        emit(self.log, LogLevel.warn, "imap.auth_failed", "authentication failed",
             user=printable(user), client=session.connection.client, failures=outcome.failures)
        # Each failure from this address waits longer before the answer.
        lines = self._lines
        lines.reads.hold(BUSY)
        lines.pause(outcome.delay, partial(self._waited, partial(self._failed_login, outcome.final)))

    def _failed_login(self, final: bool, _) -> None:
        self._answer(self.session.bad_credentials())
        if final:
            self._send(R.untagged("BYE Too many invalid authentication attempts."))
            self._close()
