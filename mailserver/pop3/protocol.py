"""
The POP3 server: RFC 1939 with CAPA and PIPELINING (RFC 2449), STLS
(RFC 2595), AUTH PLAIN and LOGIN (RFC 5034) and response codes (RFC 3206).

Written on C{Protocol} rather than C{twisted.mail.pop3}: every reply goes out
in one write on a C{TCP_NODELAY} socket (the stock server's several small
writes meet Nagle and delayed ACK, 40 ms a command), and RETR streams through
a producer instead of holding the message.

Commands are handled strictly one at a time, in order: while a login is being
checked or a message is being sent, later (pipelined) lines wait and the
transport stops reading.  Storage is reached only through the C{Mailbox} the
factory's C{mailbox_for} returns; its calls are blocking and run inline.

APOP is never offered: it needs a plaintext-equivalent secret per account and
no such store exists, so even with C{pop3.apop} on there is no timestamp in
the greeting and the command is refused.
"""

from __future__ import annotations

import enum
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Iterator

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Cooperator
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.config import Config
from mailserver.wire.flow import BUSY, INPUT, ReadControl
from mailserver.immediate_write import write_now
from mailserver.login_throttle import LoginThrottle, throttle_for
from mailserver.logs import emit, emit_failure
from mailserver.interfaces import IAccount
from mailserver.maildir import Mailbox, MessageInfo
from mailserver.metrics import ServerMetrics, unregistered_metrics
from mailserver.pop3.maildrop import Maildrop, NoSuchMessage
from mailserver.pop3.transfer import MessageTransfer, TransferStopped, WireEncoder
from mailserver.pop3.wire import (
    PLAINTEXT_REFUSED,
    err,
    is_valid_user_name,
    multiline,
    ok,
)
from mailserver.sasl import (
    MECHANISMS,
    Credentials,
    LoginExchange,
    PlainExchange,
    SASLError,
    SASLRefused,
    decode_response,
    is_loopback,
)


# Messages up to this size are read and sent in one piece.
_WHOLE_MESSAGE = 128 * 1024
# Replies held back for one send while a turn's commands are handled.
_FLUSH_OCTETS = 64 * 1024
# Commands handled for one client before the others get their turn.
_COMMANDS_PER_TURN = 100
# QUIT's renames and unlinks done per reactor turn, all sessions together
# (a few milliseconds).
_STEPS_PER_TURN = 256

# Seconds a closing connection gets to take its last replies; a client
# that does not read them is cut off then.
CLOSE_GRACE = 10.0
# Commands read ahead while the client does not read our replies, past
# which the socket is not read.
_MAX_PENDING_LINES = 1000


class _State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class POP3Server(Protocol):
    """
    One POP3 session.
    """

    _log = Logger(namespace="mailserver.pop3")

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self._config = factory.config
        self._clock = factory.reactor
        self._state = _State.AUTHORIZATION
        self._buffer = b""
        self._discarding_long_line = False
        self._pending: deque[bytes | None] = deque()
        self._processing = False
        self._outgoing: list[bytes] = []
        self._outgoing_octets = 0
        self._waiting = False
        self._closing = False
        self._connected = False
        self._stls_started = False
        self._user: bytes | None = None
        self._sasl: PlainExchange | LoginExchange | None = None
        self._auth_failures = 0
        self._errors = 0
        self._idle_call = None
        self._abort_call = None
        self._reads: ReadControl | None = None
        self._delayed_reply = None
        self._transfer: MessageTransfer | None = None
        self._account: str | None = None
        self._logout: Callable[[], None] | None = None
        self._mailbox: Mailbox | None = None
        self._maildrop: Maildrop | None = None
        self._retrieved = 0
        self._retrieved_octets = 0
        self._retrieved_numbers: set[int] = set()
        self._deleted = 0

    # Connection life.

    def connectionMade(self) -> None:
        self._connected = True
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket after all
                pass
        self._reads = ReadControl(self.transport, self._process)
        self._reads.attach()
        self._restart_idle_timer()
        write_now(self.transport, ok(f"{self._config.hostname} POP3 server ready."))

    def connectionLost(self, reason: Failure = None) -> None:
        self._connected = False
        for call in (self._idle_call, self._delayed_reply, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        if self._transfer is not None:
            self._transfer.stopProducing()
        if self._mailbox is not None and self._state is not _State.UPDATE:
            # Nothing marked with DELE is removed: only QUIT does that (and
            # a QUIT under way unlocks when its deletions are done).
            self._mailbox.unlock()
            self._mailbox = None
        if self._logout is not None:
            self._logout()
            self._logout = None
        emit(self._log, LogLevel.info, "pop3.session", "session ended",
             user=self._account or "-", client=self._client(), retrieved=self._retrieved,
             octets=self._retrieved_octets, deleted=self._deleted)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        limit = self._config.limits.max_command_line
        if b"\n" in data:
            # Only whole lines count as activity: a client trickling in a
            # byte at a time still meets the idle timeout.
            self._restart_idle_timer()
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > limit + 1:  # + 1: a CR whose LF is yet to come
                    self._discarding_long_line = True
                    self._buffer = b""
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._discarding_long_line or len(line) > limit:
                self._discarding_long_line = False
                self._pending.append(None)
            else:
                self._pending.append(line)
        if len(self._pending) > _MAX_PENDING_LINES and not self._reads.writable:
            self._reads.hold(INPUT)
        self._process()

    # Moving lines, one command at a time.

    def _process(self) -> None:
        """
        Handle the pending commands in order, at most L{_COMMANDS_PER_TURN}
        before the other sessions get the reactor's next turn.
        """
        if self._processing:
            return  # re-entered from a synchronous completion; the loop goes on
        self._processing = True
        handled = 0
        try:
            while (
                self._pending
                and not self._waiting
                and not self._closing
                and self._reads.writable  # the client reads its replies
                and handled < _COMMANDS_PER_TURN
            ):
                handled += 1
                line = self._pending.popleft()
                if line is None:
                    self._sasl = None
                    self._refuse_bad_input("Line too long.")
                elif self._sasl is not None:
                    self._continue_sasl(line)
                else:
                    self._dispatch(line)
        finally:
            self._processing = False
            self._flush()
        if self._pending and handled >= _COMMANDS_PER_TURN and not self._closing:
            self._reads.hold(INPUT)
            self._clock.callLater(0, self._next_turn)
        elif self._reads.writable and not self._closing:
            self._reads.release(INPUT)  # what was held has been handled

    def _next_turn(self) -> None:
        if self._connected and not self._closing:
            self._process()

    def _wait(self) -> None:
        """
        Hold later commands until L{_resume}: a login or a transfer is on.
        """
        self._waiting = True
        self._reads.hold(BUSY)

    def _resume(self) -> None:
        self._waiting = False
        if self._connected and not self._closing:
            self._reads.release(BUSY)
            self._process()

    def _reply(self, reply: bytes) -> None:
        """
        Replies to the commands of one turn (a client pipelining RETRs)
        go out together, in one send, unless they pass L{_FLUSH_OCTETS}.
        """
        if self._connected:
            self._outgoing.append(reply)
            self._outgoing_octets += len(reply)
            if not self._processing or self._outgoing_octets >= _FLUSH_OCTETS:
                self._flush()

    def _flush(self) -> None:
        if self._outgoing:
            data = b"".join(self._outgoing)
            self._outgoing = []
            self._outgoing_octets = 0
            if self._connected:
                write_now(self.transport, data)

    def _close(self) -> None:
        self._flush()
        self._closing = True
        self._pending.clear()
        if self._transfer is None:
            self._reads.closing()
        self.transport.loseConnection()
        self._abort_call = self._clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _refuse_bad_input(self, text: str) -> None:
        self._errors += 1
        if self._errors < self._config.limits.max_errors:
            self._reply(err(text))
            return
        self._reply(err(text) + err("Too many invalid commands."))
        self._close()

    def _restart_idle_timer(self) -> None:
        if self._transfer is not None:
            return  # a long download is not idleness; restarted when it ends
        timeout = self._config.limits.pop3_idle_timeout
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self._clock.callLater(timeout, self._idle_timeout)

    def _stop_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()

    def _idle_timeout(self) -> None:
        emit(self._log, LogLevel.info, "pop3.timeout", "disconnected for inactivity",
             user=self._account or "-", client=self._client())
        self._reply(err("Disconnected for inactivity."))
        self._close()

    def _client_address(self) -> str:
        return getattr(self.transport.getPeer(), "host", "")

    def _client(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return f"{host}:{peer.port}" if host is not None else str(peer)

    # Commands.

    def _dispatch(self, line: bytes) -> None:
        keyword, _, argument = line.partition(b" ")
        name = keyword.decode("ascii", "replace").upper()
        handler = _HANDLERS.get(self._state, {}).get(name)
        if handler is None:
            if name in _ALL_COMMANDS:
                self._refuse_bad_input(f"{name} is not valid in this state.")
            else:
                self._refuse_bad_input("Unknown command.")
            return
        reply = handler(self, argument)
        if reply is not None:
            self._reply(reply)

    def do_CAPA(self, argument: bytes) -> bytes:
        capabilities = ["TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        capabilities.append(f"EXPIRE {self._config.pop3.expire}")
        if self._config.pop3.login_delay:
            capabilities.append(f"LOGIN-DELAY {self._config.pop3.login_delay}")
        capabilities.append("SASL " + " ".join(MECHANISMS))
        if self._stls_offered():
            capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION mailserver")
        return multiline(ok("Capability list follows"), capabilities)

    def do_QUIT(self, argument: bytes) -> bytes | None:
        if self._state is _State.AUTHORIZATION:
            self._reply(ok("Logging out."))
            self._close()
            return None
        self._state = _State.UPDATE
        assert self._mailbox is not None and self._maildrop is not None
        doomed = self._maildrop.marked_deleted()
        seen = [
            info
            for number, info in self._maildrop.live()
            if number in self._retrieved_numbers and not info.seen
        ]
        if not doomed and not seen:
            self._updated(None, 0)
            return None
        self._wait()
        mailbox = self._mailbox
        d = self.factory.run_in_slices(_update_steps(mailbox, doomed, seen))
        if doomed:
            d.addCallback(lambda _: self.factory.run_blocking(mailbox.sync_removals, doomed))
        d.addCallbacks(self._updated, self._update_failed, callbackArgs=(len(doomed),))
        d.addErrback(self._log_unexpected)
        return None

    def _updated(self, _, count: int) -> None:
        self._deleted = count
        self._end_update(ok(f"Logging out, {count} messages deleted."))

    def _update_failed(self, failure: Failure) -> None:
        emit_failure(self._log, "pop3.update_failed", "removing deleted messages failed",
                     failure, user=self._account)
        self._end_update(err("[SYS/TEMP] Some deleted messages could not be removed."))

    def _end_update(self, reply: bytes) -> None:
        if self._mailbox is not None:
            self._mailbox.unlock()
            self._mailbox = None
        if self._connected:
            self._reply(reply)
            self._close()

    # AUTHORIZATION state.

    def _tls_active(self) -> bool:
        return (
            self.factory.implicit_tls
            or self._stls_started
            or ISSLTransport.providedBy(self.transport)
        )

    def _stls_offered(self) -> bool:
        return (
            self._state is _State.AUTHORIZATION
            and self.factory.tls_options is not None
            and not self._tls_active()
        )

    def _plaintext_allowed(self) -> bool:
        return (
            self._tls_active()
            or self._config.pop3.auth_over_plaintext
            or is_loopback(self.transport.getPeer())
        )

    def do_STLS(self, argument: bytes) -> bytes | None:
        if self._tls_active():
            return err("TLS is already active.")
        if self.factory.tls_options is None:
            return err("TLS is not available.")
        self._reply(ok("Begin TLS negotiation."))
        self._flush()  # the last clear-text bytes
        self.transport.startTLS(self.factory.tls_options)
        self._stls_started = True
        # RFC 2595 section 4: what the client sent before the handshake
        # must not be acted upon, and a USER given in clear is forgotten.
        self._pending.clear()
        self._buffer = b""
        self._discarding_long_line = False
        self._user = None
        return None

    def do_USER(self, argument: bytes) -> bytes:
        if not self._plaintext_allowed():
            return err(PLAINTEXT_REFUSED)
        if not is_valid_user_name(argument):
            return err("[AUTH] Invalid user name.")
        self._user = argument
        return ok()

    def do_PASS(self, argument: bytes) -> bytes | None:
        if not self._plaintext_allowed():
            return err(PLAINTEXT_REFUSED)
        if self._user is None:
            return err("No user name given.")
        username, self._user = self._user, None
        # RFC 1939: the password is the rest of the line, spaces included.
        self._login(Credentials(username, argument))
        return None

    def do_APOP(self, argument: bytes) -> bytes:
        return err("APOP is not available.")

    def do_AUTH(self, argument: bytes) -> bytes | None:
        if not argument:
            # Some clients probe with a bare AUTH for the mechanism list.
            return multiline(ok(), MECHANISMS)
        if not self._plaintext_allowed():
            return err(PLAINTEXT_REFUSED)
        mechanism, _, initial = argument.partition(b" ")
        exchange_type = MECHANISMS.get(mechanism.upper().decode("ascii", "replace"))
        if exchange_type is None:
            return err("Unsupported authentication mechanism.")
        self._sasl = exchange_type()
        if initial:
            self._continue_sasl(initial)
            return None
        return b"+ " + b64encode(self._sasl.first_challenge) + b"\r\n"

    def _continue_sasl(self, line: bytes) -> None:
        exchange, self._sasl = self._sasl, None
        try:
            answer = exchange.respond(decode_response(line))
        except SASLRefused as e:
            self._reply(err(f"[AUTH] {e}"))
            return
        except SASLError as e:
            self._reply(err(str(e)))
            return
        if isinstance(answer, Credentials):
            self._login(answer)
        else:
            self._sasl = exchange
            self._reply(b"+ " + b64encode(answer) + b"\r\n")

    def _login(self, credentials: Credentials) -> None:
        if self.factory.login_throttle.refused(self._client_address()):
            emit(self._log, LogLevel.warn, "pop3.auth_throttled",
                 "login refused unchecked: too many failed logins from there",
                 user=credentials.username.decode("utf-8", "replace"), client=self._client())
            self._reply(err("[SYS/TEMP] Too many failed logins from your address, try again later."))
            return
        self._wait()
        if not is_valid_user_name(credentials.username):
            self._login_refused(Failure(LoginFailed()), credentials.username)
            return
        d = self.factory.portal.login(
            UsernamePassword(credentials.username, credentials.password), None, IAccount
        )
        d.addCallbacks(
            self._logged_in, self._login_refused, errbackArgs=(credentials.username,)
        )
        d.addErrback(self._log_unexpected)

    def _login_refused(self, failure: Failure, username: bytes) -> None:
        if not failure.check(LoginFailed):  # UnauthorizedLogin is a LoginFailed
            emit_failure(self._log, "pop3.auth_error", "login check failed", failure,
                         client=self._client())
            self._reply(err("[SYS/TEMP] Temporary authentication failure."))
            self._resume()
            return
        self._auth_failures += 1
        self.factory.metrics.pop3_login_failures_total.inc()
        emit(self._log, LogLevel.warn, "pop3.auth_failed", "authentication failed",
             user=username.decode("utf-8", "replace"), client=self._client(),
             failures=self._auth_failures)
        delay = self.factory.login_throttle.failed(self._client_address())
        if self._connected:
            self._delayed_reply = self._clock.callLater(delay, self._answer_failed_login)

    def _answer_failed_login(self) -> None:
        self._delayed_reply = None
        self._reply(err("[AUTH] Authentication failed."))
        if self._auth_failures >= self._config.limits.max_auth_failures:
            self._close()
        else:
            self._resume()

    def _logged_in(self, result: tuple) -> None:
        _, avatar, logout = result
        if not self._connected:
            logout()
            return
        address = avatar.address
        now = self._clock.seconds()
        if self.factory.too_soon_to_log_in(address, now):
            logout()
            self._reply(
                err(
                    f"[LOGIN-DELAY] Minimum time between logins is "
                    f"{self._config.pop3.login_delay} seconds."
                )
            )
            self._resume()
            return
        # Locking and listing a big mailbox is slow file work: it runs in a
        # worker thread so other sessions go on meanwhile.
        d = self.factory.run_blocking(self._open_mailbox, address)
        d.addCallbacks(
            self._mailbox_opened,
            self._mailbox_failed,
            callbackArgs=(address, logout, now),
            errbackArgs=(address, logout),
        )
        d.addErrback(self._log_unexpected)

    def _open_mailbox(self, address: str) -> tuple[Mailbox, list[MessageInfo]] | None:
        """
        Lock and list the account's mailbox (in a worker thread); C{None}
        if another session holds it.
        """
        mailbox = self.factory.mailbox_for(address)
        if not mailbox.lock():
            return None
        try:
            return mailbox, mailbox.messages()
        except BaseException:
            mailbox.unlock()
            raise

    def _mailbox_failed(self, failure: Failure, address: str, logout) -> None:
        logout()
        if failure.check(OSError):
            emit_failure(self._log, "pop3.mailbox_failed", "opening the mailbox failed",
                         failure, user=address)
            self._reply(err("[SYS/TEMP] Mailbox is temporarily unavailable."))
        else:
            emit_failure(self._log, "pop3.mailbox_failed", "no mailbox", failure, user=address)
            self._reply(err("[SYS/PERM] Mailbox is unavailable."))
        self._resume()

    def _mailbox_opened(self, opened, address: str, logout, now: float) -> None:
        """
        Enter TRANSACTION with the locked, listed mailbox.
        """
        if opened is None:
            logout()
            self._reply(err("[IN-USE] Mailbox is locked by another POP3 session."))
            self._resume()
            return
        mailbox, messages = opened
        if not self._connected:
            mailbox.unlock()
            logout()
            return
        self.factory.record_login(address, now)
        self._account = address
        self._mailbox = mailbox
        self._maildrop = Maildrop(messages)
        self._state = _State.TRANSACTION
        self._logout = logout
        self.factory.metrics.pop3_logins_total.inc()
        count, octets = self._maildrop.count_and_octets()
        self._reply(ok(f"Logged in: {count} messages ({octets} octets)."))
        self._resume()

    def _log_unexpected(self, failure: Failure) -> None:
        emit_failure(self._log, "pop3.error", "session error", failure, client=self._client())
        self._close()

    # TRANSACTION state.

    def _lookup(self, argument: bytes) -> tuple[int, MessageInfo]:
        assert self._maildrop is not None
        return self._maildrop.lookup(argument.decode("ascii", "replace").strip())

    def do_STAT(self, argument: bytes) -> bytes:
        assert self._maildrop is not None
        count, octets = self._maildrop.count_and_octets()
        return ok(f"{count} {octets}")

    def _listing(self, argument: bytes, show: Callable[[MessageInfo], str]) -> bytes:
        """
        LIST and UIDL: one message's line, or the whole scan listing.
        """
        assert self._maildrop is not None
        if argument.strip():
            try:
                number, info = self._lookup(argument)
            except NoSuchMessage as e:
                return err(str(e))
            return ok(f"{number} {show(info)}")
        count, octets = self._maildrop.count_and_octets()
        return multiline(
            ok(f"{count} messages ({octets} octets)"),
            (f"{number} {show(info)}" for number, info in self._maildrop.live()),
        )

    def do_LIST(self, argument: bytes) -> bytes:
        return self._listing(argument, lambda info: str(info.size))

    def do_UIDL(self, argument: bytes) -> bytes:
        return self._listing(argument, lambda info: info.uid)

    def do_DELE(self, argument: bytes) -> bytes:
        assert self._maildrop is not None
        try:
            number, _ = self._lookup(argument)
        except NoSuchMessage as e:
            return err(str(e))
        self._maildrop.mark_deleted(number)
        return ok(f"Message {number} marked to be deleted.")

    def do_RSET(self, argument: bytes) -> bytes:
        assert self._maildrop is not None
        self._maildrop.reset()
        count, octets = self._maildrop.count_and_octets()
        return ok(f"{count} messages ({octets} octets).")

    def do_NOOP(self, argument: bytes) -> bytes:
        return ok()

    def do_RETR(self, argument: bytes) -> bytes | None:
        try:
            number, info = self._lookup(argument)
        except NoSuchMessage as e:
            return err(str(e))
        prefix = ok(f"{info.size} octets")
        return self._send(number, info, prefix, WireEncoder(), retrieve=True)

    def do_TOP(self, argument: bytes) -> bytes | None:
        arguments = argument.split()
        if len(arguments) != 2:
            return err("TOP needs a message number and a number of lines.")
        try:
            number, info = self._lookup(arguments[0])
        except NoSuchMessage as e:
            return err(str(e))
        if not (arguments[1].isascii() and arguments[1].isdigit()):
            return err("Invalid number of lines.")
        lines = arguments[1].lstrip(b"0")  # int() refuses 4,300 digits and more
        encoder = WireEncoder(body_lines=int(lines or b"0") if len(lines) <= 18 else 10**18)
        return self._send(number, info, ok(), encoder, retrieve=False)

    def _send(
        self, number: int, info: MessageInfo, prefix: bytes, encoder: WireEncoder, retrieve: bool
    ) -> bytes | None:
        """
        A small message goes out in one write with its C{+OK} line and
        terminator; a larger one streams through a L{MessageTransfer}.
        """
        assert self._mailbox is not None
        try:
            whole = (
                self._mailbox.read_whole(info, _WHOLE_MESSAGE)
                if info.size < _WHOLE_MESSAGE
                else None
            )
            if whole is None:
                source = self._mailbox.open(info)
        except OSError:
            emit_failure(self._log, "pop3.read_failed", "opening a message failed",
                         user=self._account, uid=info.uid)
            return err("[SYS/TEMP] The message cannot be read now.")
        if whole is not None:
            wire = prefix + encoder.encode(whole) + encoder.terminator()
            self._reply(wire)
            self._delivered(len(wire), number, retrieve)
            return None
        self._flush()  # the replies before this one go first
        self._wait()
        self._stop_idle_timer()
        self._reads.detach()  # the transfer is the transport's producer meanwhile
        self._transfer = MessageTransfer(source, self.transport, prefix, encoder)
        self._transfer.finished.addCallbacks(
            self._sent, self._send_failed, callbackArgs=(number, info, retrieve)
        )
        self._transfer.finished.addErrback(self._log_unexpected)
        self._transfer.start()
        return None

    def _sent(self, octets: int, number: int, info: MessageInfo, retrieve: bool) -> None:
        self._transfer = None
        self._reads.attach()
        self._delivered(octets, number, retrieve)
        self._restart_idle_timer()
        self._resume()

    def _delivered(self, octets: int, number: int, retrieve: bool) -> None:
        """
        Count a retrieved message; it is marked seen at QUIT, with the
        deletions (see L{_update_steps}).
        """
        if retrieve:
            self._retrieved += 1
            self._retrieved_octets += octets
            self._retrieved_numbers.add(number)
            self.factory.metrics.pop3_messages_retrieved_total.inc()
            self.factory.metrics.pop3_bytes_sent_total.inc(octets)

    def _send_failed(self, failure: Failure) -> None:
        self._transfer = None
        if failure.check(TransferStopped):
            return  # the client went away; connectionLost cleans up
        emit_failure(self._log, "pop3.read_failed", "reading a message failed; closing the "
                     "session", failure, user=self._account)
        self._close()


# The commands of each state (RFC 1939), looked up once per command line.
_COMMANDS = {
    _State.AUTHORIZATION: ("CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "QUIT"),
    _State.TRANSACTION: (
        "CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT",
    ),
}
_HANDLERS: dict[_State, dict[str, Callable[[POP3Server, bytes], bytes | None]]] = {
    state: {name: getattr(POP3Server, f"do_{name}") for name in names}
    for state, names in _COMMANDS.items()
}
_ALL_COMMANDS = frozenset(name for names in _COMMANDS.values() for name in names)


class _StepCounter:
    """
    A L{Cooperator} termination predicate: true after C{steps} calls.
    """

    def __init__(self, steps: int) -> None:
        self._left = steps

    def __call__(self) -> bool:
        self._left -= 1
        return self._left <= 0


def _update_steps(
    mailbox: Mailbox, doomed: list[MessageInfo], seen: list[MessageInfo]
) -> Iterator[None]:
    """
    The UPDATE state (RFC 1939 6), one file per step: retrieved messages
    move to C{cur/} with the seen flag, deleted ones go (their folders are
    synced afterwards, in a worker thread).  A message that cannot be
    marked seen is only logged: it stays, unflagged.

    The steps run on the reactor thread, a slice per turn: in a worker
    thread every rename would hand the GIL back and forth with the reactor
    (each of its system calls lets the worker in), which cost the other
    sessions more than the renames themselves.
    """
    for info in seen:
        try:
            mailbox.mark_seen(info)
        except OSError as e:
            emit(POP3Server._log, LogLevel.error, "pop3.seen_failed",
                 "marking a message seen failed", uid=info.uid, problem=str(e))
        yield None
    for info in doomed:
        mailbox.remove(info)
        yield None


class POP3Factory(ServerFactory):
    """
    Builds POP3 sessions that share the configuration, the portal, the
    mailbox lookup and the record of recent logins (for LOGIN-DELAY).

    @param mailbox_for: an account's canonical address to its C{Mailbox}.
    @param tls_options: for C{STLS}; C{None} disables it.
    @param implicit_tls: this listener wraps every connection in TLS (port
        995), so there is no C{STLS} and plaintext logins are allowed.
    """

    def __init__(
        self,
        *,
        config: Config,
        portal,
        mailbox_for: Callable[[str], Mailbox],
        tls_options,
        reactor,
        implicit_tls: bool = False,
        metrics: ServerMetrics | None = None,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        run_in_slices: Callable[[Iterator[None]], defer.Deferred] | None = None,
        login_throttle: LoginThrottle | None = None,
    ) -> None:
        """
        @param run_blocking: runs blocking file work and returns a Deferred
            of its result; by default in the reactor's thread pool.
        @param run_in_slices: runs an iterator of quick file steps on the
            reactor thread and returns a Deferred fired when it is done; by
            default L{_STEPS_PER_TURN} steps of all sessions per reactor turn.
        @param login_throttle: failed logins per client address, shared with
            the other listeners; by default this listener's own.
        """
        self.run_blocking = run_blocking or (
            lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        )
        self.run_in_slices = run_in_slices or Cooperator(
            terminationPredicateFactory=lambda: _StepCounter(_STEPS_PER_TURN),
            scheduler=lambda work: reactor.callLater(0, work),
        ).coiterate
        self.config = config
        self.portal = portal
        self.mailbox_for = mailbox_for
        self.tls_options = tls_options
        self.reactor = reactor
        self.implicit_tls = implicit_tls
        self.metrics = metrics or unregistered_metrics()
        self.login_throttle = login_throttle or throttle_for(config.limits, reactor)
        self._last_logins: dict[str, float] = {}

    def buildProtocol(self, addr) -> POP3Server:
        return POP3Server(self)

    def too_soon_to_log_in(self, address: str, now: float) -> bool:
        """
        RFC 2449 LOGIN-DELAY: has this account logged in too recently?
        """
        last = self._last_logins.get(address)
        delay = self.config.pop3.login_delay
        return bool(delay) and last is not None and now - last < delay

    def record_login(self, address: str, now: float) -> None:
        if self.config.pop3.login_delay:
            self._last_logins[address] = now
