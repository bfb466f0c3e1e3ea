"""
The mail transaction's half of an SMTP session: MAIL, RCPT, DATA and BDAT,
the message text, and the final reply once the intake has the message on
stable storage.

L{TransactionHandlers} is mixed into L{mailserver.smtp.session.SMTPSession},
whose state it shares; like the rest of the session it returns replies and
effects and never touches a transport.  The message text is checked by a
L{MessageSink} and streamed to the intake behind our C{Received:} field, so
a large message is never held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python.failure import Failure

import mailserver.smtp.replies as R
from mailserver.envelope import Envelope, Recipient
from mailserver.logs import addresses, emit, emit_failure
from mailserver.safe_text import printable
from mailserver.smtp.grammar import (
    GrammarError,
    MailOptions,
    Mailbox,
    mail_options,
    parse_mail,
    parse_mailbox,
    parse_rcpt,
    recipient_options,
)
from mailserver.config import BareNewline
from mailserver.smtp.message import (
    MessageSink,
    completing_fields,
    received_header,
    with_protocol,
)
from mailserver.smtp.policy import SUBMISSION
from mailserver.smtp.refusals import POLICY, STORAGE, reason_of
from mailserver.smtp.replies import Reply, reply
from mailserver.smtp.state import State
from mailserver.wire.dots import DotReader
from mailserver.wire.effects import Await

_BDAT_SYNTAX = reply(501, "5.5.4", "Syntax: BDAT size [LAST]")


@dataclass(slots=True)
class Transaction:
    """
    One mail transaction, from MAIL to the final reply.
    """

    sender: Mailbox | None
    options: MailOptions
    started: float
    recipients: list[Recipient] = field(default_factory=list)
    receiver: object = None
    sink: MessageSink | None = None
    reader: DotReader | None = None
    id: str = ""


@dataclass(slots=True)
class Chunk:
    """
    The BDAT chunk being read (RFC 3030).  A refused chunk is still read
    (its size is on the command line), then answered, so the session stays
    in step.

    @ivar resume: the state a refused chunk returns to.
    """

    remaining: int
    last: bool
    refusal: Reply | None
    resume: State


class TransactionHandlers:
    __slots__ = ()

    # MAIL and RCPT.

    def do_MAIL(self, argument: str):
        refusal = self.deps.policy.auth_required(self.account)
        if refusal is not None:
            return self.refuse("MAIL", refusal)
        try:
            path = parse_mail(argument)
            options = mail_options(path.parameters)
        except GrammarError as e:
            return _grammar_reply(e)
        if options.smtputf8 and not self.esmtp:
            return reply(503, "5.5.1", "Error: SMTPUTF8 needs EHLO")
        sender = printable(path.mailbox.address) if path.mailbox else ""
        if path.mailbox is not None and not path.mailbox.is_ascii and not options.smtputf8:
            return self.refuse("MAIL", R.SMTPUTF8_REQUIRED, sender=sender)
        limits = self.deps.limits
        if options.size is not None and options.size > limits.max_message_size:
            refusal = reply(552, "5.3.4", "Message size exceeds fixed limit")
            return self.refuse("MAIL", refusal, sender=sender, size=options.size)
        if not self.deps.intake.has_room(options.size or 0):
            return self.refuse("MAIL", R.INSUFFICIENT_STORAGE, sender=sender)
        refusal = self.deps.policy.sender(path.mailbox, self.account)
        if refusal is not None:
            return self.refuse("MAIL", refusal, sender=sender)

        def accepted(verdict) -> Reply | None:
            if verdict is not None:  # a plugin's Reject
                return self.refuse("MAIL", verdict, sender=sender)
            if self.state is not State.READY:
                return None  # closed meanwhile
            self.transaction = Transaction(path.mailbox, options, self.deps.clock.seconds())
            self.state = State.MAIL
            return R.SENDER_OK

        hooks = self.deps.hooks
        if hooks is not None and hooks.envelope_hooks:
            address = path.mailbox.address if path.mailbox else ""
            return defer.ensureDeferred(hooks.sender(self.client(), address)).addCallback(accepted)
        return accepted(None)

    def do_RCPT(self, argument: str):
        transaction = self.transaction
        try:
            path = parse_rcpt(argument)
            options = recipient_options(path.parameters)
        except GrammarError as e:
            return _grammar_reply(e)
        policy = self.deps.policy
        mailbox = policy.qualify(path.mailbox)
        sender = printable(transaction.sender.address) if transaction.sender else ""
        if not mailbox.is_ascii and not transaction.options.smtputf8:
            return self.refuse("RCPT", R.SMTPUTF8_REQUIRED, sender=sender,
                               recipient=printable(mailbox.address))
        if len(transaction.recipients) >= self.deps.limits.max_recipients:
            return self.refuse("RCPT", R.TOO_MANY_RECIPIENTS, sender=sender,
                               recipient=printable(mailbox.address))

        def check(address) -> Reply:
            if not isinstance(address, str):  # a plugin's Reject
                return self.refuse("RCPT", address, sender=sender,
                                   recipient=printable(mailbox.address))
            try:
                checked = parse_mailbox(address) if address != mailbox.address else mailbox
            except GrammarError:  # a plugin's rewrite to no address
                return self.refuse("RCPT", R.TEMPORARY_FAILURE, POLICY, sender=sender,
                                   recipient=printable(mailbox.address))
            verdict = policy.recipient(checked, self.account)
            if isinstance(verdict, Reply):
                return self.refuse("RCPT", verdict, sender=sender,
                                   recipient=printable(checked.address))
            if self.transaction is not transaction:
                return R.NEED_MAIL
            transaction.recipients.append(
                Recipient(checked.address, verdict, options.notify, options.orcpt)
            )
            return R.RECIPIENT_OK

        hooks = self.deps.hooks
        if hooks is not None and hooks.envelope_hooks:
            sender = transaction.sender.address if transaction.sender else ""
            verdict = hooks.recipient(self.client(), sender, mailbox.address)
            return defer.ensureDeferred(verdict).addCallback(check)
        return check(mailbox.address)

    # DATA.

    def do_DATA(self, argument: str) -> Reply:
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: DATA")
        transaction = self.transaction
        if not transaction.recipients:
            return R.NO_VALID_RECIPIENTS
        problem = self._begin_message(transaction)
        if problem is not None:
            self.transaction = None
            self.state = State.READY
            return self.refuse("DATA", problem, **_message_fields(transaction))
        transaction.reader = DotReader(transaction.sink.write)
        self.state = State.DATA
        return R.START_MAIL_INPUT

    def data_without_mail(self, argument: str) -> Reply:
        return reply(501, "5.5.4", "Syntax: DATA") if argument.strip() else R.NEED_MAIL

    def data_after_bdat(self, argument: str) -> Reply:
        return reply(501, "5.5.4", "Syntax: DATA") if argument.strip() else R.BAD_SEQUENCE

    def message_text(self, data: bytes) -> bytes | None:
        """
        DATA's text as it comes; the bytes after C{<CRLF>.<CRLF>} once the
        message has ended (then call L{end_of_message}), else C{None}.
        """
        return self.transaction.reader.feed(data)

    # BDAT (RFC 3030 CHUNKING).

    def _chunk_size(self, argument: str) -> tuple[int, bool] | Reply:
        words = argument.split(" ")
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 20:
            return _BDAT_SYNTAX
        if len(words) == 2 and words[1].upper() != "LAST":
            return _BDAT_SYNTAX
        return int(words[0]), len(words) == 2

    def _read_chunk(self, size: tuple[int, bool] | Reply, refusal: Reply | None):
        if size.__class__ is not tuple:
            return size
        self.chunk = Chunk(size[0], size[1], refusal, self.state)
        self.state = State.BDAT
        if size[0] == 0:
            return self.end_of_chunk()
        return None

    def bdat_without_mail(self, argument: str):
        return self._read_chunk(self._chunk_size(argument), R.NEED_MAIL)

    def do_BDAT(self, argument: str):
        size = self._chunk_size(argument)
        if size.__class__ is not tuple:
            return size
        transaction = self.transaction
        if not transaction.recipients:
            return self._read_chunk(size, R.NO_VALID_RECIPIENTS)
        refusal = self._begin_message(transaction)
        if refusal is not None:
            self.transaction = None
            self.state = State.READY
            self.refuse("BDAT", refusal, **_message_fields(transaction))
        return self._read_chunk(size, refusal)

    def next_bdat(self, argument: str):
        return self._read_chunk(self._chunk_size(argument), None)

    def chunk_text(self, data: bytes) -> None:
        """
        The next octets of the chunk (at most C{chunk.remaining}).
        """
        chunk = self.chunk
        chunk.remaining -= len(data)
        if chunk.refusal is None and self.transaction is not None:
            self.transaction.sink.write(data)

    def end_of_chunk(self):
        chunk, self.chunk = self.chunk, None
        if chunk.refusal is not None:
            self.state = chunk.resume
            return chunk.refusal
        transaction = self.transaction
        if chunk.last:
            return self.end_of_message()
        self.state = State.CHUNKING
        if transaction.sink.problem is not None:
            self.state = State.READY
            return self._refuse_message(transaction, transaction.sink.problem)
        return reply(250, "2.0.0", f"{transaction.sink.size} octets received")

    # The end of a message.

    def _begin_message(self, transaction: Transaction) -> Reply | None:
        """
        Give the message its ID and open the intake's receiver behind our
        Received field.
        """
        deps = self.deps
        connection = self.connection
        options = transaction.options
        now = deps.clock.seconds()
        tls_version, tls_cipher = connection.tls_parameters() if self.tls else (None, None)
        if self.tls and tls_version is None:
            tls_version = "TLS"
        envelope = Envelope(
            sender=transaction.sender.address if transaction.sender else "",
            recipients=tuple(transaction.recipients),
            client_address=connection.address,
            helo=self.helo or "",
            authenticated=self.account,
            ret=options.ret,
            envid=options.envid,
            body=options.body,
            smtputf8=options.smtputf8,
            size=options.size,
            id=deps.new_message_id(),
            tls_version=tls_version,
            tls_cipher=tls_cipher,
        )
        transaction.id = envelope.id
        try:
            receiver = deps.intake.begin(envelope)
        except Exception:
            emit_failure(self.log, "smtp.intake_failed", "the intake refused to begin a message",
                         id=envelope.id)
            return R.TEMPORARY_FAILURE
        only = transaction.recipients[0].address if len(transaction.recipients) == 1 else None
        trace = received_header(
            helo=self.helo or "",
            client_address=connection.address,
            hostname=deps.hostname,
            protocol=with_protocol(
                esmtp=self.esmtp,
                smtputf8=options.smtputf8,
                tls=self.tls,
                authenticated=self.account is not None,
            ),
            message_id=envelope.id,
            tls=connection.describe_tls() if self.tls else None,
            authenticated=self.account,
            recipient=only,
            when=now,
        )
        transaction.receiver = receiver
        transaction.sink = MessageSink(
            receiver,
            trace,
            max_size=deps.limits.max_message_size,
            max_line=deps.limits.max_text_line,
            max_received=deps.smtp.max_received_headers,
            normalize=deps.smtp.bare_newline == BareNewline.NORMALIZE,
            missing_fields=(
                completing_fields(envelope.id, deps.hostname, now)
                if deps.role == SUBMISSION else ()
            ),
        )
        return None

    def end_of_message(self):
        """
        The client has sent the whole message: refuse it, or wait for the
        intake to have it on stable storage before the 250.
        """
        transaction = self.transaction
        self.state = State.READY
        problem = transaction.sink.close()
        if problem is not None:
            return self._refuse_message(transaction, problem)
        # From here the receiver is the intake's to finish: a client that
        # goes away now must not abort it.
        self.transaction = None
        finished = defer.maybeDeferred(transaction.receiver.finish)
        return Await(finished, partial(self._stored, transaction))

    def _stored(self, transaction: Transaction, result) -> Reply:
        if isinstance(result, Failure):
            rejected = getattr(result.value, "reject", None)
            if rejected is not None:  # a message hook said no
                return self._refuse_message(transaction, rejected)
            if isinstance(result.value, OSError):  # the disk, not a bug: one line
                emit(self.log, LogLevel.error, "smtp.storage_failed", "storing a message failed",
                     problem=str(result.value), id=transaction.id)
            else:
                emit_failure(self.log, "smtp.storage_failed", "storing a message failed", result,
                             id=transaction.id)
            return self._refuse_message(transaction, R.storage_failure(result.value), STORAGE)
        deps = self.deps
        role = deps.metrics_role
        metrics = deps.metrics
        metrics.smtp_messages_accepted_total.inc(role=role)
        metrics.smtp_bytes_received_total.inc(transaction.sink.size, role=role)
        elapsed = deps.clock.seconds() - transaction.started
        metrics.smtp_transaction_seconds.observe(elapsed)
        answer = reply(250, "2.0.0", f"Ok: queued as {result}")
        emit(self.log, LogLevel.info, "smtp.accepted", "accepted", code=answer.code,
             enhanced=answer.enhanced, client=self.connection.address,
             helo=printable(self.helo or ""), user=printable(self.account or ""),
             **_message_fields(transaction), ms=round(elapsed * 1000, 1))
        return answer

    def _refuse_message(
        self, transaction: Transaction, problem: Reply, reason: str | None = None
    ) -> Reply:
        """
        @param reason: a word from a fixed set (a metrics label, never
            client input); by default read from the reply.
        """
        if reason is None:
            reason = reason_of(problem)
        self.transaction = None
        command = "DATA" if transaction.reader is not None else "BDAT"
        return self.refuse(command, problem, reason, **_message_fields(transaction))

    def abort_transaction(self) -> None:
        transaction, self.transaction = self.transaction, None
        if transaction is None or transaction.sink is None:
            return
        if transaction.sink.problem is None:  # else the sink has aborted it
            transaction.receiver.abort()


def _message_fields(transaction: Transaction) -> dict:
    """
    What the log says about a message: its ID, sender, recipients, size.
    """
    sink = transaction.sink
    return dict(
        sender=printable(transaction.sender.address) if transaction.sender else "",
        recipients=addresses(printable(r.address) for r in transaction.recipients),
        size=sink.size if sink is not None else 0,
        id=transaction.id,
    )


def _grammar_reply(error: GrammarError) -> Reply:
    """
    Unknown parameters are 555 (RFC 5321 4.1.1.11), anything else 501.
    """
    return reply(error.code, error.enhanced, str(error))
