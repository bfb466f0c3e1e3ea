"""
One IMAP session (RFC 3501, with LITERAL+, SASL-IR, ID, ENABLE, IDLE,
NAMESPACE, UIDPLUS, MOVE, UNSELECT, CHILDREN, LIST-EXTENDED, SPECIAL-USE,
STARTTLS and AUTHENTICATE PLAIN/LOGIN) as a state machine with pure
command handlers::

    NOT AUTHENTICATED --LOGIN/AUTHENTICATE--> AUTHENTICATED --SELECT--> SELECTED
          |   ^ STARTTLS                        ^   |  IDLE                | IDLE,
          |   +--------                         |   +--> IDLE --DONE--+    | CLOSE, UNSELECT
          +--------------- LOGOUT --------------+----------------------+---+--> LOGOUT

A handler gets the command's tag and arguments and returns a result:
responses (L{mailserver.imap.responses}), an effect of
L{mailserver.wire.effects} (close, start TLS, check a login, wait for a
Deferred of the folder store) or a L{mailserver.imap.fetcher.FetchRequest},
or a tuple of these.  No handler touches a transport; the glue in
L{mailserver.imap.protocol} does the I/O.

Written on the wire room rather than C{twisted.mail.imap4.IMAP4Server}: the
stock server reads a literal into memory whole, handles one command at a
time with a write per response (no batching for pipelined commands), has
no IDLE, MOVE, UIDPLUS, LIST-EXTENDED or SPECIAL-USE, builds a
C{MessageSet} of every UID for C{1:*}, and answers FETCH through
synchronous C{IMailbox} calls, so file reads would block the reactor.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.imap import responses as R
from mailserver.imap.grammar import Command, ParseError, astring, atom
from mailserver.imap.mailboxes import MailboxHandlers
from mailserver.imap.selected import SelectedHandlers
from mailserver.imap.state import Connection, State
from mailserver.imap.view import SelectedView
from mailserver.interfaces import FolderError, FolderGone
from mailserver.logs import emit, emit_failure
from mailserver.sasl import (
    MECHANISMS,
    Credentials,
    LoginExchange,
    PlainExchange,
    SASLCancelled,
    SASLError,
    decode_response,
)
from mailserver.wire.effects import CLOSE, START_TLS, Await, Login

_BASE_CAPABILITIES = (
    "IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS",
    "MOVE", "UNSELECT", "CHILDREN", "LIST-EXTENDED", "SPECIAL-USE",
)
# Dovecot's wording, which clients and admins already know (RFC 2595 2).
PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."


@dataclass(eq=False)
class IMAPSession(MailboxHandlers, SelectedHandlers):
    """
    The state of one session and its command handlers; those of the
    AUTHENTICATED state are in L{MailboxHandlers}, those of SELECTED in
    L{SelectedHandlers}.

    @ivar tls: the connection is encrypted (from the start, or since
        STARTTLS).
    @ivar account: the logged-in account's folders (L{IMailAccount}).
    @ivar view: the selected mailbox.
    @ivar pending_tag: the tag of the LOGIN, AUTHENTICATE or IDLE under way.
    """

    deps: object
    connection: Connection
    tls: bool = False
    state: State = State.NOT_AUTHENTICATED
    address: str | None = None
    account: object = None
    logout: Callable[[], None] | None = None
    view: SelectedView | None = None
    sasl: PlainExchange | LoginExchange | None = None
    pending_tag: str = "*"
    idle_from: State | None = None

    log = Logger()

    # Entering and leaving.

    def greet(self) -> R.Untagged:
        return R.untagged(
            f"OK [CAPABILITY {' '.join(self.capabilities())}] {self.deps.hostname} IMAP4rev1 ready."
        )

    def capabilities(self) -> list[str]:
        out = list(_BASE_CAPABILITIES)
        if self.state is State.NOT_AUTHENTICATED:
            if self.deps.tls_options is not None and not self.tls:
                out.append("STARTTLS")
            if self._plaintext_allowed():
                out += ["AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                out.append("LOGINDISABLED")
        return out

    def close(self) -> None:
        """
        The glue is closing the connection.
        """
        self.state = State.LOGOUT
        self._deselect()

    def end(self) -> None:
        """
        The connection is gone.
        """
        self.close()
        if self.logout is not None:
            self.logout()
            self.logout = None

    def _deselect(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None

    # Input.

    def command(self, command: Command):
        handler = _COMMANDS[self.state].get(command.name)
        if handler is None:
            if command.name in _ALL_COMMANDS:
                return R.bad(command.tag, f"{command.name} is not valid in the {self.state.label} state.")
            return R.bad(command.tag, "Unknown command.")
        try:
            return handler(self, command.tag, command.args)
        except ParseError as e:
            return R.bad(command.tag, f"Error in IMAP command {command.name}: {e}")

    def parse_error(self, error: ParseError):
        if error.tag is None:
            return R.untagged(f"BAD Error in IMAP command: {error}")
        return R.bad(error.tag, f"Error in IMAP command: {error}")

    def line_too_long(self):
        if self.state is State.SASL:
            self.state = State.NOT_AUTHENTICATED
            self.sasl = None
            return R.bad(self.pending_tag, "Authentication response too long.")
        return R.untagged("BAD Error in IMAP command: line too long.")

    # Common answers.

    def done(self, tag: str, text: str, code: str = "", expunges: bool = True):
        """
        A command's OK, after the changes to the selected mailbox not yet
        told.
        """
        updates = self.view.updates(expunges) if self.view is not None else []
        return (*updates, R.ok(tag, text, code))

    def failed(self, tag: str, failure: Failure):
        """
        What to say when the folder store failed.
        """
        gone = self.selected_gone(failure)
        if gone is not None:
            return gone
        error = failure.value
        if isinstance(error, FolderError):
            return R.no(tag, str(error), error.code)
        if isinstance(error, OSError):
            # A storage fault (a full disk, a link refused inside the data
            # folder): its text names the file, a traceback adds nothing.
            emit(self.log, LogLevel.error, "imap.command_failed", "a command failed",
                 user=self.address, error=str(error))
        else:
            emit_failure(self.log, "imap.command_failed", "a command failed", failure,
                         user=self.address)
        return R.no(tag, "Internal error occurred. Refer to server log for more information.", "SERVERBUG")

    def selected_gone(self, failure: Failure):
        """
        The selected mailbox was deleted or renamed by another session or
        program: its messages cannot be reached any more, so, as Dovecot
        does, say BYE (RFC 3501 leaves it open); C{None} if that is not
        what C{failure} says.
        """
        error = failure.value
        if not isinstance(error, FolderGone) or self.view is None or error.path != self.view.folder.path:
            return None
        emit(self.log, LogLevel.info, "imap.selected_deleted", "the selected mailbox was deleted",
             user=self.address)
        return (R.untagged("BYE Selected mailbox was deleted, have to disconnect."), CLOSE)

    def after(self, tag: str, deferred, then: Callable[[object], object]) -> Await:
        """
        Wait for the store, then C{then(result)}; a failure is answered
        with L{failed}.
        """

        def go(outcome):
            if isinstance(outcome, Failure):
                return self.failed(tag, outcome)
            return then(outcome)

        return Await(deferred, go)

    # Any state.

    def do_CAPABILITY(self, tag: str, args: tuple):
        return (R.untagged("CAPABILITY " + " ".join(self.capabilities())), self.done(tag, "Capability completed."))

    def do_NOOP(self, tag: str, args: tuple):
        if self.view is None:
            return R.ok(tag, "NOOP completed.")
        return self.after(tag, self.catch_up(), lambda _: self.done(tag, "NOOP completed."))

    def do_LOGOUT(self, tag: str, args: tuple):
        return (R.untagged("BYE Logging out"), R.ok(tag, "Logout completed."), CLOSE)

    def do_ID(self, tag: str, args: tuple):
        return (R.untagged('ID ("name" "mailserver")'), self.done(tag, "ID completed."))

    def do_ENABLE(self, tag: str, args: tuple):
        if not args:
            raise ParseError("Missing capability")
        for item in args:
            atom(item)
        return (R.untagged("ENABLED"), R.ok(tag, "Enabled."))

    def do_IDLE(self, tag: str, args: tuple):
        """
        RFC 2177: tell the client of changes as they happen until DONE.
        """
        self.pending_tag = tag
        self.idle_from = self.state
        self.state = State.IDLE
        updates = self.view.updates(True) if self.view is not None else []
        return (*updates, R.Continuation("idling"))

    def idle_updates(self) -> list:
        """
        The changes to push now, during IDLE.
        """
        if self.state is not State.IDLE or self.view is None:
            return []
        return self.view.updates(True)

    def idle_keepalive(self) -> R.Untagged:
        return R.untagged("OK Still here")

    def idle_line(self, line: bytes):
        tag = self.pending_tag
        self.state = self.idle_from or State.AUTHENTICATED
        self.idle_from = None
        if line.strip().upper() != b"DONE":
            return R.bad(tag, "Expected DONE.")
        if self.view is None:
            return R.ok(tag, "Idle completed.")
        return self.after(tag, self.catch_up(), lambda _: self.done(tag, "Idle completed."))

    def catch_up(self):
        """
        Bring the selected folder up to date with the disk and take the
        new messages as \\Recent (a Deferred).
        """
        view = self.view
        d = view.folder.refresh()
        if not view.readonly:
            d.addCallback(lambda _: view.folder.claim_recent())
            d.addCallback(view.add_recent)
        return d

    # NOT AUTHENTICATED.

    def _plaintext_allowed(self) -> bool:
        return self.tls or self.deps.imap.auth_over_plaintext or self.connection.loopback

    def do_STARTTLS(self, tag: str, args: tuple):
        if self.tls:
            return R.bad(tag, "TLS is already active.")
        if self.deps.tls_options is None:
            return R.bad(tag, "TLS support isn't enabled.")
        self.tls = True
        return (R.ok(tag, "Begin TLS negotiation now."), START_TLS)

    def do_LOGIN(self, tag: str, args: tuple):
        if len(args) != 2:
            raise ParseError("LOGIN needs a user name and a password")
        if not self._plaintext_allowed():
            return (R.untagged(f"BAD [ALERT] {PLAINTEXT_REFUSED}"), R.no(tag, PLAINTEXT_REFUSED, "PRIVACYREQUIRED"))
        self.pending_tag = tag
        return Login(astring(args[0]), astring(args[1]))

    def do_AUTHENTICATE(self, tag: str, args: tuple):
        if not 1 <= len(args) <= 2:
            raise ParseError("AUTHENTICATE needs a mechanism")
        if not self._plaintext_allowed():
            return R.no(tag, PLAINTEXT_REFUSED, "PRIVACYREQUIRED")
        exchange_type = MECHANISMS.get(atom(args[0]).upper())
        if exchange_type is None:
            return R.no(tag, "Unsupported authentication mechanism.")
        self.pending_tag = tag
        self.sasl = exchange_type()
        if len(args) == 2:  # SASL-IR (RFC 4959)
            return self.sasl_response(astring(args[1]))
        self.state = State.SASL
        return R.Continuation(b64encode(self.sasl.first_challenge).decode("ascii"))

    def sasl_response(self, line: bytes):
        """
        The client's answer to a C{+} challenge (or the initial response).
        """
        tag = self.pending_tag
        self.state = State.NOT_AUTHENTICATED
        try:
            answer = self.sasl.respond(decode_response(line.strip()))
        except SASLCancelled:
            self.sasl = None
            return R.bad(tag, "Authentication aborted by client.")
        except SASLError as e:
            self.sasl = None
            return R.bad(tag, str(e))
        if isinstance(answer, Credentials):
            self.sasl = None
            return Login(answer.username, answer.password)
        self.state = State.SASL
        return R.Continuation(b64encode(answer).decode("ascii"))

    def logged_in(self, address: str, logout: Callable[[], None]):
        """
        The credentials were good: set the account's folders up (the
        special-use ones at the first login).
        """
        tag = self.pending_tag
        self.address = address
        self.logout = logout
        self.account = self.deps.store.account(address)
        self.state = State.AUTHENTICATED
        code = "CAPABILITY " + " ".join(self.capabilities())
        return self.after(tag, self.account.prepare(), lambda _: R.ok(tag, "Logged in", code))

    def bad_credentials(self) -> R.Tagged:
        return R.no(self.pending_tag, "Authentication failed.", "AUTHENTICATIONFAILED")

    def logins_refused(self) -> R.Tagged:
        return R.no(
            self.pending_tag, "Too many failed logins from your address, try again later.", "UNAVAILABLE"
        )

    def login_unavailable(self) -> R.Tagged:
        return R.no(self.pending_tag, "Temporary authentication failure.", "UNAVAILABLE")


# The legal commands of each state, in one place; a name is the handler.
_ANY = {"CAPABILITY": "do_CAPABILITY", "NOOP": "do_NOOP", "LOGOUT": "do_LOGOUT", "ID": "do_ID"}
_NOT_AUTHENTICATED = {
    **_ANY, "STARTTLS": "do_STARTTLS", "LOGIN": "do_LOGIN", "AUTHENTICATE": "do_AUTHENTICATE",
}
_AUTHENTICATED = {
    **_ANY,
    "ENABLE": "do_ENABLE", "IDLE": "do_IDLE", "SELECT": "do_SELECT", "EXAMINE": "do_EXAMINE",
    "CREATE": "do_CREATE", "DELETE": "do_DELETE", "RENAME": "do_RENAME",
    "SUBSCRIBE": "do_SUBSCRIBE", "UNSUBSCRIBE": "do_UNSUBSCRIBE", "LIST": "do_LIST",
    "LSUB": "do_LSUB", "STATUS": "do_STATUS", "NAMESPACE": "do_NAMESPACE", "APPEND": "do_APPEND",
}
_SELECTED = {
    **_AUTHENTICATED,
    "CHECK": "do_CHECK", "CLOSE": "do_CLOSE", "UNSELECT": "do_UNSELECT", "EXPUNGE": "do_EXPUNGE",
    "SEARCH": "do_SEARCH", "FETCH": "do_FETCH", "STORE": "do_STORE", "COPY": "do_COPY",
    "MOVE": "do_MOVE", "UID FETCH": "do_UID_FETCH", "UID STORE": "do_UID_STORE",
    "UID SEARCH": "do_UID_SEARCH", "UID COPY": "do_UID_COPY", "UID MOVE": "do_UID_MOVE",
    "UID EXPUNGE": "do_UID_EXPUNGE",
}
_SELECTED.pop("ENABLE")  # RFC 5161: only before a mailbox is selected
_COMMANDS: dict[State, dict[str, Callable]] = {
    state: {name: getattr(IMAPSession, handler) for name, handler in table.items()}
    for state, table in (
        (State.NOT_AUTHENTICATED, _NOT_AUTHENTICATED),
        (State.AUTHENTICATED, _AUTHENTICATED),
        (State.SELECTED, _SELECTED),
    )
}
_COMMANDS[State.SASL] = _COMMANDS[State.IDLE] = _COMMANDS[State.LOGOUT] = {}
_ALL_COMMANDS = frozenset(_NOT_AUTHENTICATED) | frozenset(_SELECTED) | {"ENABLE"}
