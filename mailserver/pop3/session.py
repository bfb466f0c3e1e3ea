"""
One POP3 session as a state machine with pure command handlers: RFC 1939
with CAPA and PIPELINING (RFC 2449), STLS (RFC 2595), AUTH PLAIN and LOGIN
(RFC 5034) and response codes (RFC 2449, RFC 3206).

Given the state and a parsed command, a handler changes the state and
returns a result: a L{Response}, C{None}, an effect (L{Retrieve} a message;
from L{mailserver.wire.effects}: close, start TLS, check a login, wait for
a Deferred), or a tuple of results.  No handler touches a transport; the
glue in L{mailserver.pop3.protocol} does the I/O.  The legal sequences are
the table L{_COMMANDS} at the end of this module::

    AUTHORIZATION --USER+PASS, or AUTH [--> SASL lines]--> login checked
       |    ^                                                |
       |    +-- STLS, a failed login, LOGIN-DELAY, IN-USE    +--> TRANSACTION
       |                                                            |
       +--QUIT--> CLOSED <-- UPDATE (flag seen, remove DELEd) <--QUIT+

    any state --a close by the glue--> CLOSED

Storage is reached only through L{mailserver.interfaces.IMailbox}: opened
in a worker thread, read by the glue in batches (L{Retrieve}), updated at
QUIT a slice at a time.

APOP is never offered: it needs a plaintext-equivalent secret per account
and no such store exists, so even with C{pop3.apop} on there is no
timestamp in the greeting and the command is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import NamedTuple

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.interfaces import IMailbox
from mailserver.logs import emit, emit_failure
from mailserver.pop3 import responses as R
from mailserver.pop3.dependencies import POP3Dependencies
from mailserver.pop3.maildrop import Maildrop, NoSuchMessage
from mailserver.pop3.responses import Response, challenge, err, ok
from mailserver.pop3.retrieval import Retrieve
from mailserver.pop3.state import Connection, State
from mailserver.pop3.storage import open_mailbox, update_mailbox
from mailserver.pop3.transfer import WireEncoder
from mailserver.sasl import (
    MECHANISMS,
    Credentials,
    LoginExchange,
    PlainExchange,
    SASLError,
    SASLRefused,
    decode_response,
)
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login

# Commands the glue may hand over while the messages of earlier RETRs and
# TOPs are still being read (their answers queue behind those): what they
# do depends on no retrieval's outcome.  QUIT does (it flags what was
# retrieved), and bad input may close the session, so those wait.
BATCHED_COMMANDS = frozenset(
    {"RETR", "TOP", "LIST", "UIDL", "STAT", "DELE", "RSET", "NOOP", "CAPA"}
)


class Command(NamedTuple):
    verb: str  # upper case
    argument: bytes  # the rest of the line after one space


def parse_command(line: bytes) -> Command:
    keyword, _, argument = line.partition(b" ")
    return Command(keyword.decode("ascii", "replace").upper(), argument)


def is_valid_user_name(name: bytes) -> bool:
    """
    A name worth asking the portal about: printable UTF-8 without spaces or
    path separators, so no name ever looks like a path.
    """
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return (
        0 < len(text) <= 255
        and not text.startswith(".")
        and all(c.isprintable() and not c.isspace() and c not in "/\\" for c in text)
    )


@dataclass(eq=False, slots=True)
class POP3Session:
    """
    The state of one session and its command handlers.

    @ivar tls: the connection is encrypted (from the start, or since STLS).
    @ivar user: the name given with USER, until PASS.
    @ivar sasl: the AUTH exchange under way.
    @ivar errors: commands refused as bad input so far.
    @ivar account: the logged-in account's address.
    @ivar logout: the portal's logout for C{account}.
    @ivar mailbox: the locked mailbox, until the session or its UPDATE ends.
    @ivar retrieved_numbers: the messages sent with RETR, flagged seen at
        QUIT.
    """

    deps: POP3Dependencies
    connection: Connection
    tls: bool = False
    state: State = State.AUTHORIZATION
    user: bytes | None = None
    sasl: PlainExchange | LoginExchange | None = None
    errors: int = 0
    account: str | None = None
    logout: Callable[[], None] | None = None
    mailbox: IMailbox | None = None
    maildrop: Maildrop | None = None
    retrieved: int = 0
    retrieved_octets: int = 0
    retrieved_numbers: set[int] = field(default_factory=set)
    deleted: int = 0

    log = Logger(namespace="mailserver.pop3")

    # Entering and leaving.

    def greet(self) -> Response:
        return ok(f"{self.deps.hostname} POP3 server ready.")

    def close(self) -> None:
        """
        The glue is closing the connection.
        """
        self.state = State.CLOSED

    def end(self) -> None:
        """
        The connection is gone.  Nothing marked with DELE is removed: only
        QUIT does that (and a QUIT under way unlocks when it is done).
        """
        self.state = State.CLOSED
        if self.mailbox is not None:
            self.mailbox.unlock()
            self.mailbox = None
        if self.logout is not None:
            self.logout()
            self.logout = None
        emit(self.log, LogLevel.info, "pop3.session", "session ended",
             user=self.account or "-", client=self.connection.client, retrieved=self.retrieved,
             octets=self.retrieved_octets, deleted=self.deleted)

    # Lines.

    def command(self, command: Command):
        handler = _COMMANDS[self.state].get(command.verb)
        if handler is None:
            if not self.state.reads_commands:
                return None  # nothing more is answered
            return self._bad_input(_NOT_VALID.get(command.verb, R.UNKNOWN_COMMAND))
        return handler(self, command.argument)

    def line_too_long(self):
        self.sasl = None  # an over-long SASL response ends the exchange
        if self.state is State.SASL:
            self.state = State.AUTHORIZATION
        return self._bad_input(R.LINE_TOO_LONG)

    def _bad_input(self, response: Response):
        self.errors += 1
        if self.errors < self.deps.limits.max_errors:
            return response
        return (response, R.TOO_MANY_ERRORS, CLOSE)

    # Either state.

    def do_CAPA(self, argument: bytes) -> Response:
        pop3 = self.deps.pop3
        capabilities = ["TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        capabilities.append(f"EXPIRE {pop3.expire}")
        if pop3.login_delay:
            capabilities.append(f"LOGIN-DELAY {pop3.login_delay}")
        capabilities.append("SASL " + " ".join(MECHANISMS))
        if self.state is State.AUTHORIZATION and self.deps.tls_options is not None and not self.tls:
            capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION mailserver")
        return ok("Capability list follows", lines=tuple(capabilities))

    # AUTHORIZATION.

    def _plaintext_allowed(self) -> bool:
        return self.tls or self.deps.pop3.auth_over_plaintext or self.connection.loopback

    def log_out(self, argument: bytes):
        return (ok("Logging out."), CLOSE)

    def do_STLS(self, argument: bytes):
        """
        RFC 2595 4: what the client sent before the handshake is not acted
        upon (the glue throws it away), and a USER given in clear is
        forgotten.
        """
        if self.tls:
            return err("TLS is already active.")
        if self.deps.tls_options is None:
            return err("TLS is not available.")
        self.tls = True
        self.user = None
        return (ok("Begin TLS negotiation."), START_TLS)

    def do_USER(self, argument: bytes) -> Response:
        if not self._plaintext_allowed():
            return R.PLAINTEXT_REFUSED
        if not is_valid_user_name(argument):
            return err("Invalid user name.", "AUTH")
        self.user = argument
        return R.OKAY

    def do_PASS(self, argument: bytes):
        if not self._plaintext_allowed():
            return R.PLAINTEXT_REFUSED
        if self.user is None:
            return err("No user name given.")
        username, self.user = self.user, None
        # RFC 1939: the password is the rest of the line, spaces included.
        return Login(username, argument)

    def do_APOP(self, argument: bytes) -> Response:
        return err("APOP is not available.")

    def do_AUTH(self, argument: bytes):
        if not argument:
            # Some clients probe with a bare AUTH for the mechanism list.
            return ok(lines=tuple(MECHANISMS))
        if not self._plaintext_allowed():
            return R.PLAINTEXT_REFUSED
        mechanism, _, initial = argument.partition(b" ")
        exchange_type = MECHANISMS.get(mechanism.upper().decode("ascii", "replace"))
        if exchange_type is None:
            return err("Unsupported authentication mechanism.")
        self.sasl = exchange_type()
        if initial:
            return self.sasl_response(initial)
        self.state = State.SASL
        return challenge(self.sasl.first_challenge)

    def sasl_response(self, line: bytes):
        """
        The client's answer to a challenge (or AUTH's initial response).
        """
        exchange, self.sasl = self.sasl, None
        self.state = State.AUTHORIZATION
        try:
            answer = exchange.respond(decode_response(line))
        except SASLRefused as e:
            return err(str(e), "AUTH")
        except SASLError as e:
            return err(str(e))
        if isinstance(answer, Credentials):
            return Login(answer.username, answer.password)
        self.sasl = exchange
        self.state = State.SASL
        return challenge(answer)

    def logged_in(self, address: str, logout: Callable[[], None]):
        """
        The glue checked a L{Login}: open the account's mailbox, unless it
        logged in too recently (RFC 2449 LOGIN-DELAY).
        """
        deps = self.deps
        now = deps.clock.seconds()
        if deps.recent_logins.too_soon(address, now):
            logout()
            return err(
                f"Minimum time between logins is {deps.pop3.login_delay} seconds.", "LOGIN-DELAY"
            )
        opening = deps.run_blocking(open_mailbox, deps.mailboxes, address)
        opening.addBoth(self._release_if_gone, logout)
        return Await(opening, partial(self._mailbox_opened, address, logout, now))

    def _release_if_gone(self, opened, logout: Callable[[], None]):
        if self.state is not State.CLOSED:
            return opened
        if isinstance(opened, tuple):
            opened[0].unlock()
        logout()
        return None

    def _mailbox_opened(self, address: str, logout, now: float, opened):
        """
        Enter TRANSACTION with the locked, listed mailbox.
        """
        if isinstance(opened, Failure):
            logout()
            if opened.check(OSError):
                emit_failure(self.log, "pop3.mailbox_failed", "opening the mailbox failed",
                             opened, user=address)
                return R.MAILBOX_BROKEN
            emit_failure(self.log, "pop3.mailbox_failed", "no mailbox", opened, user=address)
            return R.NO_MAILBOX
        if opened is None:
            logout()
            return R.MAILBOX_IN_USE
        mailbox, messages = opened
        self.deps.recent_logins.record(address, now)
        self.account = address
        self.mailbox = mailbox
        self.maildrop = Maildrop(messages)
        self.state = State.TRANSACTION
        self.logout = logout
        self.deps.metrics.pop3_logins_total.inc()
        count, octets = self.maildrop.count_and_octets()
        return ok(f"Logged in: {count} messages ({octets} octets).")

    # TRANSACTION.

    def do_STAT(self, argument: bytes) -> Response:
        count, octets = self.maildrop.count_and_octets()
        return ok(f"{count} {octets}")

    def _listing(self, argument: bytes, field: str) -> Response:
        """
        LIST and UIDL: one message's line, or the whole scan listing of
        each live message's C{field}.
        """
        maildrop = self.maildrop
        if argument.strip():
            try:
                number, message = maildrop.lookup(argument.decode("ascii", "replace").strip())
            except NoSuchMessage as e:
                return err(str(e))
            return ok(f"{number} {getattr(message, field)}")
        count, octets = maildrop.count_and_octets()
        value = attrgetter(field)
        return ok(
            f"{count} messages ({octets} octets)",
            lines=tuple([f"{number} {value(message)}" for number, message in maildrop.live()]),
        )

    def do_LIST(self, argument: bytes) -> Response:
        return self._listing(argument, "size")

    def do_UIDL(self, argument: bytes) -> Response:
        return self._listing(argument, "uid")

    def do_DELE(self, argument: bytes) -> Response:
        try:
            number, _ = self.maildrop.lookup(argument.decode("ascii", "replace").strip())
        except NoSuchMessage as e:
            return err(str(e))
        self.maildrop.mark_deleted(number)
        return ok(f"Message {number} marked to be deleted.")

    def do_RSET(self, argument: bytes) -> Response:
        self.maildrop.reset()
        count, octets = self.maildrop.count_and_octets()
        return ok(f"{count} messages ({octets} octets).")

    def do_NOOP(self, argument: bytes) -> Response:
        return R.OKAY

    def do_RETR(self, argument: bytes):
        try:
            number, message = self.maildrop.lookup(argument.decode("ascii", "replace").strip())
        except NoSuchMessage as e:
            return err(str(e))
        return Retrieve(
            self.mailbox, message, ok(f"{message.size} octets"), WireEncoder(),
            partial(self._sent, number, message, True),
            partial(self.maildrop.following, number),
        )

    def do_TOP(self, argument: bytes):
        arguments = argument.split()
        if len(arguments) != 2:
            return err("TOP needs a message number and a number of lines.")
        try:
            number, message = self.maildrop.lookup(arguments[0].decode("ascii", "replace").strip())
        except NoSuchMessage as e:
            return err(str(e))
        if not (arguments[1].isascii() and arguments[1].isdigit()):
            return err("Invalid number of lines.")
        lines = arguments[1].lstrip(b"0")  # int() refuses 4,300 digits and more
        encoder = WireEncoder(body_lines=int(lines or b"0") if len(lines) <= 18 else 10**18)
        return Retrieve(
            self.mailbox, message, R.OKAY, encoder, partial(self._sent, number, message, False)
        )

    def _sent(self, number: int, message, retrieve: bool, outcome: int | Failure):
        """
        A message went out (C{outcome} octets), or could not be read.  A
        retrieved one is flagged seen at QUIT, with the deletions.
        """
        if isinstance(outcome, Failure):
            if outcome.check(FileNotFoundError):
                # IMAP (or another program) expunged it since the listing.
                emit(self.log, LogLevel.info, "pop3.message_removed", "message removed meanwhile",
                     user=self.account, uid=message.uid)
                return R.REMOVED
            emit_failure(self.log, "pop3.read_failed", "opening a message failed", outcome,
                         user=self.account, uid=message.uid)
            return R.UNREADABLE
        if retrieve:
            self.retrieved += 1
            self.retrieved_octets += outcome
            self.retrieved_numbers.add(number)
            metrics = self.deps.metrics
            metrics.pop3_messages_retrieved_total.inc()
            metrics.pop3_bytes_sent_total.inc(outcome)
        return None

    def do_QUIT(self, argument: bytes):
        """
        Enter UPDATE: the mailbox goes to the update, which unlocks it when
        done, whether or not the client waits for the answer.
        """
        self.state = State.UPDATE
        doomed = self.maildrop.marked_deleted()
        retrieved = self.retrieved_numbers
        seen = [
            message
            for number, message in self.maildrop.live()
            if number in retrieved and not message.seen
        ]
        mailbox, self.mailbox = self.mailbox, None
        if not doomed and not seen:
            mailbox.unlock()
            return self._updated(0, None)
        deps = self.deps
        updating = update_mailbox(deps.run_in_slices, deps.run_blocking, mailbox, doomed, seen)
        return Await(updating, partial(self._updated, len(doomed)))

    def _updated(self, count: int, outcome):
        if isinstance(outcome, Failure):
            emit_failure(self.log, "pop3.update_failed", "removing deleted messages failed",
                         outcome, user=self.account)
            return (R.NOT_REMOVED, CLOSE)
        self.deleted = count
        return (ok(f"Logging out, {count} messages deleted."), CLOSE)


_S = POP3Session
# The legal sequences: for each verb, its handler in the states that read
# commands, or None where it is out of sequence ("not valid in this state").
_SEQUENCES: dict[str, tuple] = {
    #        AUTHORIZATION   TRANSACTION
    "CAPA": (_S.do_CAPA, _S.do_CAPA),
    "USER": (_S.do_USER, None),
    "PASS": (_S.do_PASS, None),
    "APOP": (_S.do_APOP, None),
    "AUTH": (_S.do_AUTH, None),
    "STLS": (_S.do_STLS, None),
    "QUIT": (_S.log_out, _S.do_QUIT),
    "STAT": (None, _S.do_STAT),
    "LIST": (None, _S.do_LIST),
    "UIDL": (None, _S.do_UIDL),
    "RETR": (None, _S.do_RETR),
    "TOP": (None, _S.do_TOP),
    "DELE": (None, _S.do_DELE),
    "RSET": (None, _S.do_RSET),
    "NOOP": (None, _S.do_NOOP),
}
_COMMANDS: dict[State, dict[str, Callable]] = {state: {} for state in State}
for _column, _state in enumerate((State.AUTHORIZATION, State.TRANSACTION)):
    _COMMANDS[_state] = {
        verb: row[_column] for verb, row in _SEQUENCES.items() if row[_column] is not None
    }
_NOT_VALID = {verb: err(f"{verb} is not valid in this state.") for verb in _SEQUENCES}
del _S, _column, _state
