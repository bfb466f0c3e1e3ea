"""
One SMTP session as a state machine with pure command handlers (RFC 5321,
with PIPELINING, SIZE, ETRN, STARTTLS, AUTH PLAIN LOGIN,
ENHANCEDSTATUSCODES, 8BITMIME, DSN, SMTPUTF8 and CHUNKING).

Given the state and a parsed command, a handler changes the state and
returns a result: a reply, C{None}, an effect of L{mailserver.wire.effects}
(close, start TLS, check a login, wait for a Deferred), a Deferred of a
result, or a tuple of results.  No handler touches a transport; the glue in
L{mailserver.smtp.protocol} does the I/O.  The legal sequences are the
table L{_SEQUENCES} at the end of this module (a table, not an automat
machine: an automat input costs about ten dict lookups, and the table is
looked up for every command of every message; see bench/README.md)::

    START --HELO/EHLO--> READY --MAIL--> MAIL --DATA--> DATA --.--> READY
      ^                  |  ^              |
      |   STARTTLS       |  |   RSET, EHLO +--BDAT--> BDAT --> CHUNKING --BDAT LAST--> READY
      +------------------+  +-- AUTH --> AUTH (SASL lines) --> READY

    any state --QUIT, or a close by the glue--> CLOSED
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger, LogLevel

import mailserver.smtp.replies as R
from mailserver.hooks import Client
from mailserver.logs import emit
from mailserver.safe_text import printable
from mailserver.sasl import (
    MECHANISMS,
    Credentials,
    LoginExchange,
    PlainExchange,
    SASLCancelled,
    SASLError,
    decode_response,
)
from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.grammar import (
    Command,
    GrammarError,
    Mailbox,
    is_domain,
    parse_domain_argument,
    parse_mailbox,
)
from mailserver.smtp.refusals import ETRN_DENIED, reason_of
from mailserver.smtp.replies import Reply, reply
from mailserver.smtp.state import Connection, State
from mailserver.smtp.transaction import Chunk, Transaction, TransactionHandlers
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login

# RFC 5321 4.5.3.2: commands that cost us but move no mail forward.
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "EXPN", "ETRN", "RSET", "HELP"})

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


@dataclass(eq=False, slots=True)
class SMTPSession(TransactionHandlers):
    """
    The state of one session and its command handlers; the mail
    transaction's handlers are in L{TransactionHandlers}.

    @ivar tls: the connection is encrypted (from the start, or since
        STARTTLS).
    @ivar helo: the name given in HELO/EHLO, C{None} before it.
    @ivar account: the authenticated account's address.
    @ivar logout: the portal's logout for C{account}.
    @ivar sasl: the AUTH exchange under way.
    @ivar chunk: the BDAT chunk being read.
    """

    deps: SMTPDependencies
    connection: Connection
    tls: bool = False
    state: State = State.START
    helo: str | None = None
    esmtp: bool = False
    account: str | None = None
    logout: Callable[[], None] | None = None
    sasl: PlainExchange | LoginExchange | None = None
    transaction: Transaction | None = None
    chunk: Chunk | None = None

    log = Logger()

    # Entering and leaving.

    def greet(self):
        hooks = self.deps.hooks
        if hooks is not None and hooks.connection_hooks:
            return Await(defer.ensureDeferred(hooks.connection(self.client())), self._greeting)
        return self._greeting(None)

    def _greeting(self, verdict):
        if verdict is None or not isinstance(verdict, Reply):  # None, or a Failure
            return reply(220, "", f"{self.deps.hostname} ESMTP mailserver")
        return (self.refuse("CONNECT", verdict), CLOSE)

    def refuse(self, command: str, answer: Reply, reason: str | None = None,
               event: str = "smtp.rejected", **fields) -> Reply:
        """
        Log and count a refusal (one C{smtp.rejected} event, Postfix's
        C{reject:} line) and return its reply.

        @param reason: the word for it (L{mailserver.smtp.refusals}); by
            default read from the reply.
        @param fields: what else the event says (C{sender}, C{recipient},
            C{id}...), or says instead (C{user}: the name an AUTH tried).
        """
        if reason is None:
            reason = reason_of(answer)
        deps = self.deps
        deps.metrics.smtp_refusals_total.inc(role=deps.metrics_role, reason=reason)
        facts = dict(command=command, code=answer.code, enhanced=answer.enhanced, reason=reason,
                     reply=printable(answer.text, None), client=self.connection.address,
                     helo=printable(self.helo or ""), user=printable(self.account or ""))
        facts.update(fields)
        emit(self.log, LogLevel.info if answer.temporary else LogLevel.warn, event, "refused",
             **facts)
        return answer

    def close(self) -> None:
        """
        The glue is closing the connection.
        """
        self.state = State.CLOSED
        self.abort_transaction()

    def end(self) -> None:
        """
        The connection is gone.
        """
        self.close()
        if self.logout is not None:
            self.logout()
            self.logout = None

    def between_messages(self) -> bool:
        """
        May the session be closed now without cutting a message transfer
        short (RFC 5321 3.8)?
        """
        state = self.state
        return state.reads_lines and state is not State.CHUNKING

    def client(self) -> Client:
        return Client(
            address=self.connection.address,
            port=self.connection.port,
            role=self.deps.role,
            helo=self.helo or "",
            authenticated=self.account,
            tls=self.tls,
            _unread=self.connection.unread,
        )

    # Lines.

    def command(self, command: Command):
        handler = _COMMANDS[self.state].get(command.verb)
        if handler is None:
            return R.UNKNOWN_COMMAND
        if handler.__class__ is Reply:
            return handler
        return handler(self, command.argument)

    def line_too_long(self) -> Reply:
        if self.state is State.AUTH:  # the exchange is over: the next line is a command
            self.sasl = None
            self.state = State.READY
        return R.LINE_TOO_LONG

    # Commands.

    def _hello(self, argument: str, esmtp: bool) -> Reply | None:
        try:
            helo = parse_domain_argument(argument)
        except GrammarError:
            return reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self.abort_transaction()
        self.helo = helo
        self.esmtp = esmtp
        self.state = State.READY
        return None

    def do_HELO(self, argument: str) -> Reply:
        return self._hello(argument, False) or reply(250, "", self.deps.hostname)

    def do_EHLO(self, argument: str) -> Reply:
        problem = self._hello(argument, True)
        if problem is not None:
            return problem
        lines = [
            self.deps.hostname,
            "PIPELINING",
            f"SIZE {self.deps.limits.max_message_size}",
            "VRFY",
            "ETRN",
        ]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self.deps.policy.offers_auth and self._auth_allowed() and self.account is None:
            lines.append("AUTH " + " ".join(MECHANISMS))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        return Reply(250, "", tuple(lines))

    def do_RSET(self, argument: str) -> Reply:
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: RSET")
        self.abort_transaction()
        if self.state is not State.START:
            self.state = State.READY
        return R.OK

    def do_NOOP(self, argument: str) -> Reply:
        return R.OK

    def do_QUIT(self, argument: str):
        return (R.BYE, CLOSE)

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
        return self.deps.policy.vrfy(self._lookup_argument(argument), self.account)

    def do_EXPN(self, argument: str) -> Reply:
        if not argument.strip():
            return reply(501, "5.5.4", "Syntax: EXPN list")
        return self.deps.policy.expn(self._lookup_argument(argument), self.account)

    def do_ETRN(self, argument: str) -> Reply:
        """
        RFC 1985: start delivery of queued mail for a domain.  C{@domain}
        is taken as the domain itself; C{#queue} names are not supported
        (458).  Strangers may not make us scan the queue (459), only
        authenticated or loopback clients; 253 says how many messages were
        scheduled, 251 that none were waiting, 250 that delivery was started
        where the count is another process's to know (a worker); with no
        relay queue configured the answer is 458.
        """
        node = argument.strip()
        domain = node[1:] if node.startswith("@") else node
        if node.startswith("#"):
            return reply(458, "4.3.0", f"Unable to queue messages for node {node}")
        if not domain or not is_domain(domain):
            return reply(501, "5.5.4", "Syntax: ETRN domain")
        if self.account is None and not self.connection.loopback:
            refusal = reply(459, "4.7.1", f"Node {domain} not allowed: authenticate first")
            return self.refuse("ETRN", refusal, ETRN_DENIED, domain=domain)
        flush = self.deps.flush_queue
        if flush is None:
            return reply(458, "4.3.0", f"Unable to queue messages for node {domain}: no queue")
        count = flush(domain)
        if count is None:
            return reply(250, "2.0.0", f"OK, queuing for node {domain} started")
        if count == 0:
            return reply(251, "2.0.0", "No messages waiting for node " + domain)
        return reply(253, "2.0.0", f"OK, {count} pending messages for node {domain} started")

    # STARTTLS (RFC 3207).

    def _starttls_problem(self, argument: str) -> Reply | None:
        if argument.strip():
            return reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls:
            return R.TLS_ACTIVE
        if not self._starttls_offered():
            return R.NOT_IMPLEMENTED
        return None

    def do_STARTTLS(self, argument: str):
        """
        The session starts over under TLS: the client greets again and
        what it was told in plaintext (its login, too) is forgotten.
        """
        problem = self._starttls_problem(argument)
        if problem is not None:
            return problem
        self.tls = True
        self.helo = None
        self.esmtp = False
        if self.logout is not None:
            self.logout()
            self.logout = None
        self.account = None
        self.state = State.START
        return (R.READY_FOR_TLS, START_TLS)

    def starttls_in_mail(self, argument: str) -> Reply:
        return self._starttls_problem(argument) or R.IN_TRANSACTION

    def _starttls_offered(self) -> bool:
        return self.deps.tls_options is not None and not self.tls

    # AUTH (RFC 4954).

    def _auth_allowed(self) -> bool:
        return self.tls or self.deps.smtp.auth_over_plaintext or self.connection.loopback

    def _auth_problem(self) -> Reply | None:
        if not self.deps.policy.offers_auth:
            return R.AUTH_NOT_OFFERED
        if not self.esmtp:
            return R.NEED_EHLO
        if self.account is not None:
            return R.ALREADY_AUTHENTICATED
        return None

    def do_AUTH(self, argument: str):
        problem = self._auth_problem()
        if problem is not None:
            return problem
        if not self._auth_allowed():
            return self.refuse("AUTH", R.ENCRYPTION_REQUIRED)
        mechanism, _, initial = argument.strip().partition(" ")
        exchange_type = MECHANISMS.get(mechanism.upper())
        if exchange_type is None:
            return R.UNKNOWN_MECHANISM
        self.sasl = exchange_type()
        if initial:
            return self.sasl_response(initial.encode("ascii", "replace"))
        self.state = State.AUTH
        return reply(334, "", b64encode(self.sasl.first_challenge).decode("ascii"))

    def auth_in_mail(self, argument: str) -> Reply:
        return self._auth_problem() or R.IN_TRANSACTION

    def auth_before_ehlo(self, argument: str) -> Reply:
        """
        A listener that does not offer AUTH says so first, as Postfix does.
        """
        return self._auth_problem() or R.NEED_EHLO

    def sasl_response(self, line: bytes):
        """
        The client's answer to a 334 challenge (or AUTH's initial response).
        """
        self.state = State.READY
        try:
            answer = self.sasl.respond(decode_response(line.strip()))
        except SASLCancelled:
            self.sasl = None
            return R.AUTH_ABORTED
        except SASLError as e:
            self.sasl = None
            return reply(501, "5.5.2", str(e))
        if isinstance(answer, Credentials):
            self.sasl = None
            return Login(answer.username, answer.password)
        self.state = State.AUTH
        return reply(334, "", b64encode(answer).decode("ascii"))

    def logged_in(self, account: str, logout: Callable[[], None]) -> Reply:
        self.account = account
        self.logout = logout
        return R.AUTH_SUCCESSFUL


# The legal sequences, in one place: what each verb does in each state that
# reads commands.  A reply is the answer there (the command is out of
# sequence); a name is the handler that checks the rest and moves the state.
_SEQUENCES = {
    #            START                READY                MAIL                 CHUNKING
    "HELO":     ("do_HELO",           "do_HELO",           "do_HELO",           "do_HELO"),
    "EHLO":     ("do_EHLO",           "do_EHLO",           "do_EHLO",           "do_EHLO"),
    "MAIL":     (R.NEED_HELO,         "do_MAIL",           R.NESTED_MAIL,       R.NESTED_MAIL),
    "RCPT":     (R.NEED_MAIL,         R.NEED_MAIL,         "do_RCPT",           R.BAD_SEQUENCE),
    "DATA":     ("data_without_mail", "data_without_mail", "do_DATA",           "data_after_bdat"),
    "BDAT":     ("bdat_without_mail", "bdat_without_mail", "do_BDAT",           "next_bdat"),
    "RSET":     ("do_RSET",           "do_RSET",           "do_RSET",           "do_RSET"),
    "NOOP":     ("do_NOOP",           "do_NOOP",           "do_NOOP",           "do_NOOP"),
    "QUIT":     ("do_QUIT",           "do_QUIT",           "do_QUIT",           "do_QUIT"),
    "HELP":     ("do_HELP",           "do_HELP",           "do_HELP",           "do_HELP"),
    "VRFY":     ("do_VRFY",           "do_VRFY",           "do_VRFY",           "do_VRFY"),
    "EXPN":     ("do_EXPN",           "do_EXPN",           "do_EXPN",           "do_EXPN"),
    "ETRN":     (R.NEED_HELO,         "do_ETRN",           R.IN_TRANSACTION,    R.IN_TRANSACTION),
    "STARTTLS": ("do_STARTTLS",       "do_STARTTLS",       "starttls_in_mail",  "starttls_in_mail"),
    "AUTH":     ("auth_before_ehlo",  "do_AUTH",           "auth_in_mail",      "auth_in_mail"),
    # TURN is unsafe (RFC 2821 dropped it); RFC 5321 dropped SEND.
    "TURN":     (R.NOT_IMPLEMENTED,) * 4,
    "SEND":     (R.NOT_IMPLEMENTED,) * 4,
}  # fmt: skip
_SEQUENCES["SOML"] = _SEQUENCES["SAML"] = _SEQUENCES["MAIL"]


def _entry(cell: Reply | str) -> Reply | Callable:
    return cell if isinstance(cell, Reply) else getattr(SMTPSession, cell)


# The table looked up once per command: state -> verb -> reply or handler.
_COMMANDS: dict[State, dict[str, Reply | Callable]] = {
    state: {verb: _entry(row[column]) for verb, row in _SEQUENCES.items()}
    for column, state in enumerate((State.START, State.READY, State.MAIL, State.CHUNKING))
}
