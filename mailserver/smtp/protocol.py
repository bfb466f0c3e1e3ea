"""
The SMTP server protocol (RFC 5321): one session.

Bytes are cut into command lines here; each command goes to a handler that
returns a L{Reply} (or a Deferred of one) and never writes to the transport.
Replies for every complete command in one read are written at once, which is
what PIPELINING (RFC 2920) asks for.  Message text (DATA, BDAT) is read in
bulk by L{DotReader} and streamed to the intake through L{MessageSink}.

Extensions: PIPELINING, SIZE, ETRN, STARTTLS, AUTH PLAIN LOGIN,
ENHANCEDSTATUSCODES, 8BITMIME, DSN, SMTPUTF8, CHUNKING.
"""

from __future__ import annotations

import enum
from base64 import b64encode
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.envelope import Envelope, Recipient
from mailserver.flow import INPUT, ReadControl
from mailserver.hooks import Client
from mailserver.interfaces import IAccount
from mailserver.sasl import (
    MECHANISMS,
    Credentials,
    SASLCancelled,
    SASLError,
    decode_response,
    is_loopback,
)
from mailserver.smtp import replies as R
from mailserver.smtp.grammar import (
    GrammarError,
    Mailbox,
    MailOptions,
    is_domain,
    mail_options,
    parse_command,
    parse_domain_argument,
    parse_mail,
    parse_mailbox,
    parse_rcpt,
    recipient_options,
)
from mailserver.smtp.message import (
    DotReader,
    MessageSink,
    received_header,
    with_protocol,
)
from mailserver.smtp.policy import SUBMISSION
from mailserver.smtp.replies import Reply, reply

if TYPE_CHECKING:
    from mailserver.smtp.factory import SMTPFactory

# RFC 4954 4: a SASL response line may be up to 12288 octets.
_MAX_AUTH_LINE = 12288
# Input held while a command is being handled, past which reading stops.
_MAX_PENDING_INPUT = 64 * 1024
# Commands handled for one client before the others get their turn.
_COMMANDS_PER_TURN = 100
# Seconds a closing connection gets to take its last replies; a client
# that does not read them is cut off then, not kept for ever.
CLOSE_GRACE = 10.0
# RFC 5321 4.5.3.2: commands that cost us but move no mail forward.
_JUNK = frozenset({"NOOP", "VRFY", "EXPN", "ETRN", "RSET", "HELP"})

_HELP = {
    "HELO": "HELO <hostname>",
    "EHLO": "EHLO <hostname>",
    "MAIL": "MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [RET=FULL|HDRS] [ENVID=x] [SMTPUTF8]",
    "RCPT": "RCPT TO:<address> [NOTIFY=...] [ORCPT=type;address]",
    "DATA": "DATA, then the message, ended by a line with a single dot",
    "BDAT": "BDAT <size> [LAST]",
    "RSET": "RSET",
    "NOOP": "NOOP",
    "QUIT": "QUIT",
    "HELP": "HELP [command]",
    "VRFY": "VRFY <address>",
    "EXPN": "EXPN <list>",
    "ETRN": "ETRN <domain>",
    "STARTTLS": "STARTTLS",
    "AUTH": "AUTH PLAIN|LOGIN [initial-response]",
}


class _State(enum.Enum):
    COMMAND = "command"
    AUTH = "auth"  # waiting for a SASL response line
    DATA = "data"
    BDAT = "bdat"  # reading a chunk's octets
    CLOSED = "closed"


@dataclass
class _Transaction:
    """
    One mail transaction, from MAIL to the final reply.
    """

    sender: Mailbox | None
    options: MailOptions
    started: float
    recipients: list[Recipient] = field(default_factory=list)
    receiver: object = None
    sink: MessageSink | None = None
    chunked: bool = False


class SMTPServer(Protocol):
    """
    One SMTP session.
    """

    log = Logger()

    def __init__(self, factory: SMTPFactory) -> None:
        self.factory = factory
        self._config = factory.config
        self._limits = factory.config.limits
        self._state = _State.COMMAND
        self._buffer = b""
        self._outgoing: list[bytes] = []
        self._waiting: defer.Deferred | None = None
        self._processing = False
        self._discarding_line = False
        self._errors = 0
        self._auth_failures = 0
        self._login_name = ""
        self._helo: str | None = None
        self._esmtp = False
        self._tls = False
        self._account: str | None = None
        self._logout = None
        self._sasl = None
        self._transaction: _Transaction | None = None
        self._reader: DotReader | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._idle_call = None
        self._abort_call = None
        self._junk = 0
        self._turn = 0
        self._reads: ReadControl | None = None
        self._counted = False
        self._shutting_down = False
        self.client_address = ""
        self.closed = defer.Deferred()

    # Connection life.

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket after all
                pass
        peer = self.transport.getPeer()
        self.client_address = getattr(peer, "host", "") or "127.0.0.1"
        self._tls = self.factory.implicit_tls or ISSLTransport.providedBy(self.transport)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._answer(refusal)
            self._close()
            return
        self._counted = True
        self._reads = ReadControl(self.transport, self._process)
        self._reads.attach()
        self.factory.metrics.smtp_connections_total.inc(role=self.factory.metrics_role)
        self.factory.metrics.smtp_connections_active.inc(role=self.factory.metrics_role)
        self._restart_idle_timer()
        hooks = self.factory.hooks
        if hooks is not None and hooks.connection_hooks:
            self._run(defer.ensureDeferred(hooks.connection(self._client())), self._greet)
        else:
            self._greet(None)
        self._flush()

    def _greet(self, verdict) -> None:
        if isinstance(verdict, Failure) or verdict is None:
            self._answer(reply(220, "", f"{self._config.hostname} ESMTP mailserver"))
            return
        self._answer(Reply(verdict.code, verdict.enhanced, (verdict.text,)))
        self._close()

    def connectionLost(self, reason: Failure = None) -> None:
        self._state = _State.CLOSED
        self._stop_idle_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_transaction()
        if self._logout is not None:
            self._logout()
            self._logout = None
        if self._counted:
            self.factory.metrics.smtp_connections_active.dec(role=self.factory.metrics_role)
        self.factory.release(self)
        self.closed.callback(None)

    def shut_down(self) -> None:
        """
        The server is stopping: say 421 now, or after the running message
        transfer has been answered (RFC 5321 3.8).
        """
        self._shutting_down = True
        self._close_if_shutting_down()

    def _close_if_shutting_down(self) -> None:
        if (
            self._shutting_down
            and self._state in (_State.COMMAND, _State.AUTH)
            and self._waiting is None
            and (self._transaction is None or self._transaction.sink is None)
        ):
            self._answer(reply(421, "4.3.2", f"{self._config.hostname} Service shutting down"))
            self._close()

    def _close(self) -> None:
        self._flush()
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._stop_idle_timer()
            self._abort_transaction()
            if self._reads is not None:
                self._reads.closing()
            self.transport.loseConnection()
            self._abort_call = self.factory.reactor.callLater(
                CLOSE_GRACE, self.transport.abortConnection
            )

    # Timers.

    def _restart_idle_timer(self) -> None:
        """
        Give the client the next request's time: a command line must be
        complete within C{smtp_command_timeout} (sending it a byte at a time
        does not extend that), message text within C{smtp_data_timeout}
        plus a second for every C{min_data_rate} octets received.
        """
        in_message = self._state in (_State.DATA, _State.BDAT)
        timeout = self._limits.smtp_data_timeout if in_message else self._limits.smtp_command_timeout
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.reactor.callLater(timeout, self._timed_out)

    def _extend_for_data(self, octets: int) -> None:
        if self._idle_call is None or not self._idle_call.active():
            return
        rate = self._limits.min_data_rate
        if rate:
            self._idle_call.delay(octets / rate)
        else:
            self._idle_call.reset(self._limits.smtp_data_timeout)

    def _stop_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _timed_out(self) -> None:
        self._idle_call = None
        self.log.info(
            "SMTP timeout: client={client} state={state}",
            client=self.client_address, state=self._state.value,
        )
        self._answer(reply(421, "4.4.2", f"{self._config.hostname} Error: timeout exceeded"))
        self._close()

    # Input.

    def dataReceived(self, data: bytes) -> None:
        if self._state is _State.CLOSED:
            return
        if self._state in (_State.DATA, _State.BDAT):
            self._extend_for_data(len(data))
        self._buffer += data
        if len(self._buffer) > _MAX_PENDING_INPUT and (
            self._waiting is not None or not self._reads.writable
        ):
            self._reads.hold(INPUT)
        self._process()

    def _process(self) -> None:
        """
        Handle everything complete in the buffer, then write all replies at
        once.  Stops while a handler's Deferred is pending, and after
        L{_COMMANDS_PER_TURN} commands: the rest waits for the reactor's next
        turn, so one client's flood of pipelined commands does not hold up
        every other session.
        """
        if self._processing:
            return
        self._processing = True
        self._turn = 0
        try:
            while (
                self._buffer
                and self._waiting is None
                and self._state is not _State.CLOSED
                and self._reads.writable
                and self._turn < _COMMANDS_PER_TURN
            ):
                if self._state is _State.DATA:
                    self._read_data()
                elif self._state is _State.BDAT:
                    self._read_chunk()
                elif not self._read_lines():
                    break  # an incomplete line: wait for more
        finally:
            self._processing = False
        if self._turn >= _COMMANDS_PER_TURN and self._state is not _State.CLOSED:
            self._reads.hold(INPUT)  # the next turn's input is already here
            self.factory.reactor.callLater(0, self._next_turn)
        elif self._waiting is None:
            self._close_if_shutting_down()
            if self._reads.writable:
                self._reads.release(INPUT)  # what was held has been handled
        self._flush()

    def _next_turn(self) -> None:
        if self._state is not _State.CLOSED:
            self._process()

    def _read_lines(self) -> bool:
        """
        Handle complete lines until the state leaves command mode; commands
        end in CRLF, a bare LF is tolerated as Postfix does.  Returns
        C{False} when only an incomplete line is left.
        """
        complete = True
        buffer = self._buffer
        position = 0
        start = position
        while (
            self._state in (_State.COMMAND, _State.AUTH)
            and self._waiting is None
            and self._buffer is buffer  # STARTTLS throws the rest away
            and position < len(buffer)
            and self._reads.writable  # the client reads its replies
            and self._turn < _COMMANDS_PER_TURN
        ):
            limit = _MAX_AUTH_LINE if self._state is _State.AUTH else self._limits.max_command_line
            newline = buffer.find(b"\n", position)
            if newline < 0:
                if len(buffer) - position > limit:
                    position = len(buffer)
                    if not self._discarding_line:
                        self._discarding_line = True
                        self._answer(R.LINE_TOO_LONG)
                complete = False
                break
            line = buffer[position:newline]
            position = newline + 1
            self._turn += 1
            if self._discarding_line:  # the end of a line already refused
                self._discarding_line = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + 2 > limit:
                self._answer(R.LINE_TOO_LONG)
            elif self._state is _State.AUTH:
                self._sasl_response(line)
            else:
                self._command(line)
        if self._buffer is buffer:  # STARTTLS may have thrown the buffer away
            self._buffer = buffer[position:]
        if position > start and self._state in (_State.COMMAND, _State.AUTH):
            self._restart_idle_timer()  # a whole command arrived in time
        return complete

    def _command(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except GrammarError as e:
            self._answer(reply(500, "5.5.2", str(e)))
            return
        handler = _HANDLERS.get(command.verb)
        if handler is None:
            self._answer(R.UNKNOWN_COMMAND)
            return
        if command.verb in _JUNK:
            # Past the allowance each one counts as an error, so a flood of
            # them ends with 421 (Postfix's smtpd_junk_command_limit).
            self._junk += 1
            if self._junk > self._limits.max_junk_commands:
                self._errors += 1
                if self._errors >= self._limits.max_errors:
                    self._answer(
                        reply(421, "4.7.0", f"{self._config.hostname} Error: too many errors")
                    )
                    self._close()
                    return
        result = handler(self, command.argument)
        if isinstance(result, defer.Deferred):
            self._run(result, self._answer_result)
        elif result is not None:
            self._answer(result)

    def _run(self, waiting: defer.Deferred, then) -> None:
        """
        Pause input until C{waiting} fires, then hand its result to C{then}
        and go on with what the client sent meanwhile.
        """
        self._waiting = waiting
        waiting.addBoth(self._finished_waiting, waiting, then)

    def _finished_waiting(self, result, waiting, then) -> None:
        if self._waiting is not waiting:
            return
        self._waiting = None
        if self._state is _State.CLOSED:
            return
        then(result)
        self._process()

    def _answer_result(self, result) -> None:
        if isinstance(result, Failure):
            self.log.failure("SMTP handler failed", failure=result)
            result = R.TEMPORARY_FAILURE
        if result is not None:
            self._answer(result)

    # Output.

    def _answer(self, answer: Reply) -> None:
        if self._state is _State.CLOSED and answer.code != 421:
            return
        self._outgoing.append(answer.render())
        if answer.code >= 500:
            self._errors += 1
            if self._errors >= self._limits.max_errors and self._state is not _State.CLOSED:
                self._outgoing.append(
                    reply(421, "4.7.0", f"{self._config.hostname} Error: too many errors").render()
                )
                self._close()

    def _flush(self) -> None:
        if self._outgoing and self.transport is not None:
            self.transport.write(b"".join(self._outgoing))
            self._outgoing = []

    # Session facts.

    def _client(self) -> Client:
        peer = self.transport.getPeer()
        return Client(
            address=self.client_address,
            port=getattr(peer, "port", 0),
            role=self.factory.role,
            helo=self._helo or "",
            authenticated=self._account,
            tls=self._tls,
        )

    def _auth_allowed(self) -> bool:
        return (
            self._tls
            or self._config.smtp.auth_over_plaintext
            or is_loopback(self.transport.getPeer())
        )

    def _starttls_offered(self) -> bool:
        return self.factory.tls_options is not None and not self._tls

    def _tls_description(self) -> str | None:
        if not self._tls:
            return None
        handle = getattr(self.transport, "getHandle", lambda: None)()
        version = getattr(handle, "get_protocol_version_name", None)
        cipher = getattr(handle, "get_cipher_name", None)
        if version is None or cipher is None:
            return "using TLS"
        return f"using {version()} with cipher {cipher()}"

    # Commands.

    def not_implemented(self, argument: str) -> Reply:
        """
        TURN (unsafe, RFC 2821 dropped it) and SEND (RFC 5321 dropped it).
        """
        return R.NOT_IMPLEMENTED

    def _hello(self, argument: str, esmtp: bool) -> Reply | None:
        try:
            helo = parse_domain_argument(argument)
        except GrammarError:
            return reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self._abort_transaction()
        self._helo = helo
        self._esmtp = esmtp
        return None

    def do_HELO(self, argument: str) -> Reply:
        return self._hello(argument, False) or reply(250, "", self._config.hostname)

    def do_EHLO(self, argument: str) -> Reply:
        problem = self._hello(argument, True)
        if problem is not None:
            return problem
        lines = [
            self._config.hostname,
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "VRFY",
            "ETRN",
        ]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self._auth_allowed() and self._account is None:
            lines.append("AUTH " + " ".join(MECHANISMS))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        return Reply(250, "", tuple(lines))

    def do_MAIL(self, argument: str) -> Reply | defer.Deferred:
        if self._helo is None:
            return R.NEED_HELO
        if self._transaction is not None:
            return R.NESTED_MAIL
        if self.factory.policy.role == SUBMISSION and self._account is None:
            return R.AUTH_REQUIRED
        try:
            path = parse_mail(argument)
            options = mail_options(path.parameters)
        except GrammarError as e:
            return _grammar_reply(e)
        if options.smtputf8 and not self._esmtp:
            return reply(503, "5.5.1", "Error: SMTPUTF8 needs EHLO")
        if path.mailbox is not None and not path.mailbox.is_ascii and not options.smtputf8:
            return R.SMTPUTF8_REQUIRED
        if options.size is not None and options.size > self._limits.max_message_size:
            return reply(552, "5.3.4", "Message size exceeds fixed limit")
        if not self.factory.intake.has_room(options.size or 0):
            return R.INSUFFICIENT_STORAGE
        refusal = self.factory.policy.sender(path.mailbox, self._account)
        if refusal is not None:
            return refusal

        def accepted(verdict) -> Reply:
            if verdict is not None:
                return Reply(verdict.code, verdict.enhanced, (verdict.text,))
            self._transaction = _Transaction(path.mailbox, options, self.factory.reactor.seconds())
            return reply(250, "2.1.0", "Ok")

        hooks = self.factory.hooks
        if hooks is not None and hooks.envelope_hooks:
            address = path.mailbox.address if path.mailbox else ""
            return defer.ensureDeferred(hooks.sender(self._client(), address)).addCallback(accepted)
        return accepted(None)

    def do_RCPT(self, argument: str) -> Reply | defer.Deferred:
        transaction = self._transaction
        if transaction is None:
            return R.NEED_MAIL
        if transaction.sink is not None:
            return R.BAD_SEQUENCE
        try:
            path = parse_rcpt(argument)
            options = recipient_options(path.parameters)
        except GrammarError as e:
            return _grammar_reply(e)
        mailbox = path.mailbox
        assert mailbox is not None
        if not mailbox.domain:
            mailbox = Mailbox(mailbox.local, self._config.local_domains[0])
        if not mailbox.is_ascii and not transaction.options.smtputf8:
            return R.SMTPUTF8_REQUIRED
        if len(transaction.recipients) >= self._limits.max_recipients:
            return R.TOO_MANY_RECIPIENTS

        def check(address) -> Reply:
            if not isinstance(address, str):
                return Reply(address.code, address.enhanced, (address.text,))
            try:
                checked = parse_mailbox(address) if address != mailbox.address else mailbox
            except GrammarError:
                return R.TEMPORARY_FAILURE
            verdict = self.factory.policy.recipient(checked, self._account)
            if isinstance(verdict, Reply):
                return verdict
            if self._transaction is not transaction:
                return R.NEED_MAIL
            transaction.recipients.append(
                Recipient(checked.address, verdict, options.notify, options.orcpt)
            )
            return reply(250, "2.1.5", "Ok")

        hooks = self.factory.hooks
        if hooks is not None and hooks.envelope_hooks:
            sender = transaction.sender.address if transaction.sender else ""
            verdict = hooks.recipient(self._client(), sender, mailbox.address)
            return defer.ensureDeferred(verdict).addCallback(check)
        return check(mailbox.address)

    def _begin_message(self, transaction: _Transaction) -> Reply | None:
        """
        Open the intake's receiver behind our Received field.
        """
        envelope = Envelope(
            sender=transaction.sender.address if transaction.sender else "",
            recipients=tuple(transaction.recipients),
            client_address=self.client_address,
            helo=self._helo or "",
            authenticated=self._account,
            ret=transaction.options.ret,
            envid=transaction.options.envid,
            body=transaction.options.body,
            smtputf8=transaction.options.smtputf8,
            size=transaction.options.size,
        )
        try:
            receiver = self.factory.intake.begin(envelope)
        except Exception:
            self.log.failure("intake refused to begin a message")
            return R.TEMPORARY_FAILURE
        only = transaction.recipients[0].address if len(transaction.recipients) == 1 else None
        trace = received_header(
            helo=self._helo or "",
            client_address=self.client_address,
            hostname=self._config.hostname,
            protocol=with_protocol(
                esmtp=self._esmtp,
                smtputf8=transaction.options.smtputf8,
                tls=self._tls,
                authenticated=self._account is not None,
            ),
            session_id=self.factory.next_session_id(),
            tls=self._tls_description(),
            authenticated=self._account,
            recipient=only,
            when=self.factory.reactor.seconds(),
        )
        transaction.receiver = receiver
        transaction.sink = MessageSink(
            receiver,
            trace,
            max_size=self._limits.max_message_size,
            max_line=self._limits.max_text_line,
            max_received=self._config.smtp.max_received_headers,
        )
        return None

    def do_DATA(self, argument: str) -> Reply | None:
        transaction = self._transaction
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: DATA")
        if transaction is None or transaction.chunked:
            return R.NEED_MAIL if transaction is None else R.BAD_SEQUENCE
        if not transaction.recipients:
            return R.NO_VALID_RECIPIENTS
        problem = self._begin_message(transaction)
        if problem is not None:
            self._transaction = None
            return problem
        assert transaction.sink is not None
        self._reader = DotReader(transaction.sink, self._limits.max_text_line)
        self._state = _State.DATA
        self._restart_idle_timer()
        return reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def _read_data(self) -> None:
        assert self._reader is not None
        rest = self._reader.feed(self._buffer)
        self._buffer = b""
        if rest is not None:
            self._buffer = rest
            self._reader = None
            self._state = _State.COMMAND
            self._restart_idle_timer()
            self._end_of_message()

    def do_BDAT(self, argument: str) -> Reply | None:
        """
        RFC 3030 CHUNKING.  A refused chunk is still read (its size is on
        the command line), then answered, so the session stays in step.
        """
        words = argument.split(" ")
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 20:
            return reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
        if len(words) == 2 and words[1].upper() != "LAST":
            return reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
        self._bdat_remaining = int(words[0])
        self._bdat_last = len(words) == 2
        self._bdat_refusal = None
        transaction = self._transaction
        if transaction is None:
            self._bdat_refusal = R.NEED_MAIL
        elif not transaction.recipients:
            self._bdat_refusal = R.NO_VALID_RECIPIENTS
        elif transaction.sink is None:
            transaction.chunked = True
            self._bdat_refusal = self._begin_message(transaction)
            if self._bdat_refusal is not None:
                self._transaction = None
        self._state = _State.BDAT
        self._restart_idle_timer()
        if self._bdat_remaining == 0:
            self._end_of_chunk()
        return None

    def _read_chunk(self) -> None:
        piece = self._buffer[: self._bdat_remaining]
        self._buffer = self._buffer[len(piece) :]
        self._bdat_remaining -= len(piece)
        if self._bdat_refusal is None and self._transaction is not None:
            sink = self._transaction.sink
            assert sink is not None
            sink.write(piece)
        if self._bdat_remaining == 0:
            self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        self._state = _State.COMMAND
        self._restart_idle_timer()
        if self._bdat_refusal is not None:
            self._answer(self._bdat_refusal)
            return
        transaction = self._transaction
        assert transaction is not None and transaction.sink is not None
        if self._bdat_last:
            self._end_of_message()
        elif transaction.sink.problem is not None:
            self._refuse_message(transaction, transaction.sink.problem)
        else:
            self._answer(reply(250, "2.0.0", f"{transaction.sink.size} octets received"))

    def _end_of_message(self) -> None:
        transaction = self._transaction
        assert transaction is not None and transaction.sink is not None
        problem = transaction.sink.close()
        if problem is not None:
            self._refuse_message(transaction, problem)
            return
        # From here the receiver is the intake's to finish: a client that
        # goes away now must not abort it.
        self._transaction = None
        finished = defer.maybeDeferred(transaction.receiver.finish)
        self._run(finished, lambda result: self._stored(transaction, result))

    def _refuse_message(
        self, transaction: _Transaction, problem: Reply, reason: str | None = None
    ) -> None:
        """
        @param reason: a word from a fixed set (a metrics label, never
            client input); by default read from the enhanced code.
        """
        if reason is None:
            reason = {
                R.TOO_BIG: "size",
                R.LOOP_DETECTED: "loop",
                R.BARE_NEWLINE: "bare-newline",
                R.DATA_LINE_TOO_LONG: "line-length",
                R.INSUFFICIENT_STORAGE: "storage",
                R.TEMPORARY_FAILURE: "storage",
            }.get(problem, "policy")
        self.factory.metrics.smtp_messages_rejected_total.inc(
            role=self.factory.metrics_role, reason=reason
        )
        self._transaction = None
        self._log_transaction(transaction, f"rejected ({reason})", problem)
        self._answer(problem)

    def _log_transaction(self, transaction: _Transaction, outcome: str, answer: Reply) -> None:
        """
        One greppable line per transaction, as Postfix writes them.
        """
        elapsed_ms = (self.factory.reactor.seconds() - transaction.started) * 1000
        fields = dict(
            outcome=outcome,
            code=answer.code,
            enhanced=answer.enhanced,
            client=self.client_address,
            helo=self._helo or "-",
            user=self._account or "-",
            sender=transaction.sender.log_safe() if transaction.sender else "",
            recipients=",".join(f"<{r.address}>" for r in transaction.recipients),
            size=transaction.sink.size if transaction.sink is not None else 0,
            ms=elapsed_ms,
        )
        # Every field is in the event for structured observers; the text is
        # put together here, as Twisted's formatter would take ten fields
        # through string.Formatter once per message.
        line = (
            "{code} {enhanced} client={client} helo={helo} user={user}"
            " from=<{sender}> to={recipients} size={size} time={ms:.1f}ms"
        ).format(**fields)
        self.log.info("SMTP {outcome}: {line}", line=line, **fields)

    def _stored(self, transaction: _Transaction, result) -> None:
        self._transaction = None
        if isinstance(result, Failure):
            rejected = getattr(result.value, "reject", None)
            if rejected is not None:  # a message hook said no
                problem = Reply(rejected.code, rejected.enhanced, (rejected.text,))
                self._refuse_message(transaction, problem, "plugin")
                return
            if isinstance(result.value, OSError):  # the disk, not a bug: one line
                self.log.error("storing a message failed: {problem}", problem=str(result.value))
            else:
                self.log.failure("storing a message failed", failure=result)
            problem = R.storage_failure(result.value)
            self._refuse_message(transaction, problem, "storage")
            return
        assert transaction.sink is not None
        role = self.factory.metrics_role
        metrics = self.factory.metrics
        metrics.smtp_messages_accepted_total.inc(role=role)
        metrics.smtp_bytes_received_total.inc(transaction.sink.size, role=role)
        metrics.smtp_transaction_seconds.observe(self.factory.reactor.seconds() - transaction.started)
        answer = reply(250, "2.0.0", f"Ok: queued as {result}")
        self._log_transaction(transaction, f"accepted {result}", answer)
        self._answer(answer)

    def _abort_transaction(self) -> None:
        transaction, self._transaction = self._transaction, None
        self._reader = None
        if transaction is not None and transaction.sink is not None and transaction.sink.problem is None:
            transaction.receiver.abort()

    def do_RSET(self, argument: str) -> Reply:
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: RSET")
        self._abort_transaction()
        return R.OK

    def do_NOOP(self, argument: str) -> Reply:
        return R.OK

    def do_QUIT(self, argument: str) -> None:
        self._answer(reply(221, "2.0.0", "Bye"))
        self._close()

    def do_HELP(self, argument: str) -> Reply:
        topic = argument.strip().upper()
        if not topic:
            return Reply(214, "2.0.0", ("Commands:", " ".join(_HELP), "See RFC 5321"))
        if topic in _HELP:
            return reply(214, "2.0.0", _HELP[topic])
        return reply(504, "5.5.4", "HELP topic unknown")

    def _lookup_argument(self, argument: str) -> Mailbox | None:
        text = argument.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        try:
            return parse_mailbox(text) if "@" in text else Mailbox(text, "")
        except GrammarError:
            return None

    def do_VRFY(self, argument: str) -> Reply:
        if not argument.strip():
            return reply(501, "5.5.4", "Syntax: VRFY address")
        return self.factory.policy.vrfy(self._lookup_argument(argument), self._account)

    def do_EXPN(self, argument: str) -> Reply:
        if not argument.strip():
            return reply(501, "5.5.4", "Syntax: EXPN list")
        return self.factory.policy.expn(self._lookup_argument(argument), self._account)

    def do_ETRN(self, argument: str) -> Reply:
        """
        RFC 1985: start delivery of queued mail for a domain.  C{@domain}
        is taken as the domain itself; C{#queue} names are not supported
        (458).  Strangers may not make us scan the queue (459), only
        authenticated or loopback clients; 253 says how many messages were
        scheduled, 251 that none were waiting; with no relay queue
        configured the answer is 458.
        """
        if self._helo is None:
            return R.NEED_HELO
        if self._transaction is not None:
            return reply(503, "5.5.1", "Error: MAIL transaction in progress")
        node = argument.strip()
        domain = node[1:] if node.startswith("@") else node
        if node.startswith("#"):
            return reply(458, "4.3.0", f"Unable to queue messages for node {node}")
        if not domain or not is_domain(domain):
            return reply(501, "5.5.4", "Syntax: ETRN domain")
        if self._account is None and not is_loopback(self.transport.getPeer()):
            return reply(459, "4.7.1", f"Node {domain} not allowed: authenticate first")
        runner = self.factory.queue_runner
        if runner is None:
            return reply(458, "4.3.0", f"Unable to queue messages for node {domain}: no queue")
        count = runner.flush(domain)
        if count == 0:
            return reply(251, "2.0.0", "No messages waiting for node " + domain)
        return reply(253, "2.0.0", f"OK, {count} pending messages for node {domain} started")

    def do_STARTTLS(self, argument: str) -> Reply | None:
        """
        RFC 3207.  Whatever the client pipelined after STARTTLS is thrown
        away unread (it arrived in plaintext), and the session starts over.
        """
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: STARTTLS")
        if self._tls:
            return reply(503, "5.5.1", "Error: TLS already active")
        if not self._starttls_offered():
            return reply(502, "5.5.1", "Error: command not implemented")
        if self._transaction is not None:
            return reply(503, "5.5.1", "Error: MAIL transaction in progress")
        self._answer(reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()
        self._buffer = b""
        self.transport.startTLS(self.factory.tls_options)
        self._tls = True
        self._helo = None
        self._esmtp = False
        if self._logout is not None:
            self._logout()
            self._logout = None
        self._account = None
        return None

    # AUTH (RFC 4954).

    def do_AUTH(self, argument: str) -> Reply | None:
        if self._helo is None or not self._esmtp:
            return reply(503, "5.5.1", "Error: send EHLO first")
        if self._account is not None:
            return reply(503, "5.5.1", "Error: already authenticated")
        if self._transaction is not None:
            return reply(503, "5.5.1", "Error: MAIL transaction in progress")
        if not self._auth_allowed():
            return reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        mechanism, _, initial = argument.strip().partition(" ")
        exchange_type = MECHANISMS.get(mechanism.upper())
        if exchange_type is None:
            return reply(504, "5.5.4", "Unrecognized authentication type")
        self._sasl = exchange_type()
        if initial:
            self._sasl_response(initial.encode("ascii", "replace"))
            return None
        self._state = _State.AUTH
        return reply(334, "", b64encode(self._sasl.first_challenge).decode("ascii"))

    def _sasl_response(self, line: bytes) -> None:
        self._state = _State.COMMAND
        try:
            answer = self._sasl.respond(decode_response(line.strip()))
        except SASLCancelled:
            self._sasl = None
            self._answer(reply(501, "5.0.0", "Authentication aborted"))
            return
        except SASLError as e:
            self._sasl = None
            self._answer(reply(501, "5.5.2", str(e)))
            return
        if isinstance(answer, Credentials):
            self._sasl = None
            self._login(answer)
            return
        self._state = _State.AUTH
        self._answer(reply(334, "", b64encode(answer).decode("ascii")))

    def _login(self, credentials: Credentials) -> None:
        self._login_name = credentials.username.decode("utf-8", "replace")
        login = self.factory.login_throttle.check(
            self.client_address,
            lambda: self.factory.portal.login(
                UsernamePassword(credentials.username, credentials.password), None, IAccount
            ),
        )
        if login is None:
            self.log.warn(
                "SMTP login refused unchecked for {user!r} from {client}:"
                " too many failed logins from there",
                user=self._login_name, client=self.client_address,
            )
            self._answer(
                reply(454, "4.7.0", "Too many failed logins from your address, try again later")
            )
            return
        self._run(login, self._logged_in)

    def _logged_in(self, result) -> None:
        if not isinstance(result, Failure):
            _, avatar, self._logout = result
            self._account = avatar.address
            self._auth_failures = 0
            self._answer(reply(235, "2.7.0", "Authentication successful"))
            return
        if not result.check(LoginFailed):
            self.log.failure("AUTH failed unexpectedly", failure=result)
            self._answer(reply(454, "4.7.0", "Temporary authentication failure"))
            return
        self._auth_failures += 1
        # Each failure from this address waits longer before the answer.
        delay = self.factory.login_throttle.delay(self.client_address)
        self.log.warn(
            "SMTP authentication failed for {user!r} from {client} ({failures} in this session)",
            user=self._login_name, client=self.client_address, failures=self._auth_failures,
        )
        if self._auth_failures >= self._limits.max_auth_failures:
            self._answer(reply(535, "5.7.8", "Authentication credentials invalid"))
            self._answer(reply(421, "4.7.0", f"{self._config.hostname} Error: too many failed logins"))
            self._close()
            return
        paused: defer.Deferred = defer.Deferred()
        self.factory.reactor.callLater(delay, paused.callback, None)
        self._run(paused, lambda _: self._answer(reply(535, "5.7.8", "Authentication credentials invalid")))


_HANDLERS = {
    "HELO": SMTPServer.do_HELO,
    "EHLO": SMTPServer.do_EHLO,
    "MAIL": SMTPServer.do_MAIL,
    "SOML": SMTPServer.do_MAIL,
    "SAML": SMTPServer.do_MAIL,
    "RCPT": SMTPServer.do_RCPT,
    "DATA": SMTPServer.do_DATA,
    "BDAT": SMTPServer.do_BDAT,
    "RSET": SMTPServer.do_RSET,
    "NOOP": SMTPServer.do_NOOP,
    "QUIT": SMTPServer.do_QUIT,
    "HELP": SMTPServer.do_HELP,
    "VRFY": SMTPServer.do_VRFY,
    "EXPN": SMTPServer.do_EXPN,
    "ETRN": SMTPServer.do_ETRN,
    "STARTTLS": SMTPServer.do_STARTTLS,
    "AUTH": SMTPServer.do_AUTH,
    "TURN": SMTPServer.not_implemented,
    "SEND": SMTPServer.not_implemented,
}


def _grammar_reply(error: GrammarError) -> Reply:
    """
    Bad parameters are 555 (RFC 5321 4.1.1.11), anything else 501.
    """
    code = 555 if error.enhanced == "5.5.4" else 501
    return reply(code, error.enhanced, str(error))
