"""
Random bytes and random command sequences, split at random points, never
crash a POP3 session: every complete line gets exactly one well-formed
response (or the session closes cleanly, for a reason it states), multi-line
responses are dot-stuffed and end with C{.CRLF}, and the mailbox loses
exactly the messages marked with DELE, and only at QUIT.

The responses are checked against a small model of RFC 1939 that follows the
session through its states, so a wrong count, a message sent with the wrong
bytes or a DELE forgotten shows up as well as a crash.
"""

from __future__ import annotations

import gc
import re
from base64 import b64decode, b64encode
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import globalLogPublisher

from mailserver.testing import (
    LOOPBACK,
    REMOTE,
    FakeRealm,
    MemoryMaildirs,
    POP3Harness,
    make_pop3_config,
)

USER = "bob@localhost"
TLS = object()  # stands for the server's TLS options
STATUS = re.compile(rb"^(\+OK( |$)|-ERR |\+ )")
TOO_MANY_ERRORS = b"-ERR Too many invalid commands."
IDLE = b"-ERR Disconnected for inactivity."
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
BAD_INPUT = re.compile(
    rb"^-ERR (Unknown command\.|Line too long\.|[A-Z]+ is not valid in this state\.)$"
)


def b64(data: bytes) -> bytes:
    return b64encode(data)


NUMBERS = st.one_of(
    st.integers(-2, 6).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"0", b"00001", b"99999999999999999999999999", b"1" * 600, b"9" * 5000]),
    st.sampled_from(
        [
            b"\xef\xbc\x91", b"\xc2\xb2", b" 1", b"1 ", b"\t2", b"1 2", b"+1", b"0x1", b"1.0",
            b"\x001", b"1\x00", b"1\r", b"\x1c1",
        ]
    ),
)
FIXED = [
    b"USER bob@localhost", b"USER BOB@localhost", b"USER carol@localhost", b"USER", b"USER ",
    b"USER .hidden", b"USER a/b", b"USER \xff", b"USER bob@localhost extra",
    b"PASS secret", b"PASS pass word", b"PASS wrong", b"PASS", b"PASS \x00secret",
    b"APOP bob@localhost 0123456789abcdef0123456789abcdef", b"APOP",
    b"AUTH", b"AUTH ", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH plain", b"AUTH CRAM-MD5", b"AUTH \xff",
    b"AUTH PLAIN " + b64(b"\0bob@localhost\0secret"),
    b"AUTH PLAIN " + b64(b"\0bob@localhost\0nope"),
    b"AUTH PLAIN " + b64(b"x\0bob@localhost\0secret"),
    b"AUTH PLAIN " + b64(b"\0\xff\0secret"),
    b"AUTH PLAIN !!!", b"AUTH PLAIN =", b"AUTH PLAIN *",
    b"AUTH LOGIN " + b64(b"bob@localhost"),
    b64(b"\0bob@localhost\0secret"), b64(b"bob@localhost"), b64(b"secret"), b64(b"\xff\0\xff"),
    b"*", b"=", b"!!!", b"STLS", b"stls", b"STLS now", b"CAPA", b"capa", b"STAT", b"LIST", b"UIDL",
    b"LIST ", b"NOOP", b"RSET", b"QUIT", b"quit", b"", b" ", b"\x00", b"\xff\xfe\xfd", b"TOP",
    b"TOP 1", b"TOP 1 2 3", b"RETR", b"DELE", b"QUIT now", b"NOOP\x00",
]
COMMANDS = st.one_of(
    st.sampled_from(FIXED),
    st.builds(
        lambda keyword, number: keyword + b" " + number,
        st.sampled_from([b"LIST", b"UIDL", b"RETR", b"DELE", b"list", b"Retr", b"dele"]),
        NUMBERS,
    ),
    st.builds(
        lambda number, lines: b"TOP " + number + b" " + lines,
        NUMBERS,
        st.one_of(NUMBERS, st.integers(0, 4).map(lambda n: str(n).encode())),
    ),
    st.integers(490, 530).map(lambda size: b"NOOP " + b"x" * size),
    st.binary(max_size=30),
)
SMALL = st.integers(0, 5).map(lambda n: str(n).encode())
TRANSACTION_COMMANDS = st.one_of(
    st.sampled_from([b"STAT", b"LIST", b"UIDL", b"NOOP", b"RSET", b"CAPA", b"QUIT"]),
    st.builds(
        lambda keyword, number: keyword + b" " + number,
        st.sampled_from([b"LIST", b"UIDL", b"RETR", b"DELE"]),
        SMALL,
    ),
    st.builds(lambda number, lines: b"TOP " + number + b" " + lines, SMALL, SMALL),
)
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
LOGIN = b"USER bob@localhost\r\nPASS secret\r\n"
LOGINS = st.sampled_from(
    [b"", LOGIN, LOGIN, b"AUTH PLAIN " + b64(b"\0bob@localhost\0secret") + b"\r\n"]
)

MESSAGE_LINES = st.sampled_from(
    [b"Subject: x", b"From: a@b", b"", b".", b"..", b".x", b"body", b"\xff\x00 8-bit", b"a\rb"]
)
MESSAGE = st.builds(
    lambda lines, newline: b"\n".join(lines) + (b"\n" if newline and lines else b""),
    st.lists(MESSAGE_LINES, max_size=8),
    st.booleans(),
)


def client_lines(data: bytes) -> list[bytes]:
    """
    The complete lines in C{data} as the server sees them: up to each LF,
    without one CR before it.
    """
    return [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")[:-1]]


def message_number(argument: bytes) -> int | None:
    """
    The number a message argument names (decimal digits, surrounding white
    space allowed), or C{None}.
    """
    text = argument.decode("ascii", "replace").strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text.lstrip("0")) < 20 else 10**20


def stuffed(lines: list[bytes]) -> bytes:
    """
    Lines as a multi-line response body: dot-stuffed, CRLF, and the
    terminating line.
    """
    body = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)
    return body + b".\r\n"


def wire(data: bytes) -> bytes:
    """
    A stored (LF) message as a multi-line response body, terminator included.
    """
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return stuffed(lines)


def top(data: bytes, body_lines: int) -> bytes:
    """
    The header section, its blank line and C{body_lines} lines of the body.
    """
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if b"" not in lines:
        return wire(data)
    end = lines.index(b"") + 1 + body_lines
    return wire(b"\n".join(lines[:end]) + b"\n")


@dataclass
class Model:
    """
    What the client knows: the mailbox at login, the session state, and the
    messages marked deleted.
    """

    messages: list[bytes]
    uids: list[str]
    limit: int
    max_errors: int
    max_auth_failures: int
    tls_offered: bool
    transaction: bool = False
    sasl: bool = False
    errors: int = 0
    auth_failures: int = 0
    logins: int = 0
    marked: set[int] = field(default_factory=set)
    retrieved: set[int] = field(default_factory=set)
    closed_by: bytes | None = None
    quit_deleted: bool = False
    tls_started: bool = False

    def size(self, number: int) -> int:
        data = self.messages[number - 1]
        return len(data) + data.count(b"\n")

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.marked]

    def usable(self, argument: bytes) -> int | None:
        number = message_number(argument)
        if number is None or not 1 <= number <= len(self.messages) or number in self.marked:
            return None
        return number

    def totals(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(self.size(n) for n in live)


class Transcript:
    """
    The server's output, read as a client reads it: status lines and
    multi-line responses.
    """

    def __init__(self, output: bytes) -> None:
        assert not output or output.endswith(b"\r\n"), output[-80:]
        self.lines = output[:-2].split(b"\r\n") if output else []
        self.position = 0

    def more(self) -> bool:
        return self.position < len(self.lines)

    def status(self) -> bytes:
        line = self.lines[self.position]
        self.position += 1
        assert STATUS.match(line), line
        assert b"\r" not in line and b"\n" not in line, line
        return line

    def body(self) -> list[bytes]:
        lines = []
        while True:
            assert self.more(), "multi-line response without its terminating line"
            line = self.lines[self.position]
            self.position += 1
            if line == b".":
                return lines
            assert not line.startswith(b".") or line.startswith(b".."), line
            lines.append(line[1:] if line.startswith(b".") else line)

    def body_bytes(self) -> bytes:
        return stuffed(self.body())


def check_authorization(
    model: Model, name: str, argument: bytes, status: bytes, out: Transcript
) -> None:
    if name == "CAPA":
        assert status.startswith(b"+OK")
        capabilities = out.body()
        assert b"USER" in capabilities and b"SASL PLAIN LOGIN" in capabilities
        assert (b"STLS" in capabilities) == (model.tls_offered and not model.tls_started)
    elif name == "AUTH" and not argument:
        assert status == b"+OK"
        assert out.body() == [b"PLAIN", b"LOGIN"]
    elif name == "QUIT":
        assert status == b"+OK Logging out."
        model.closed_by = status
    elif name == "STLS":
        if status == b"+OK Begin TLS negotiation.":
            assert model.tls_offered and not model.tls_started
            model.tls_started = True
        else:
            why = b"already active." if model.tls_started else b"not available."
            assert status == b"-ERR TLS is " + why
    elif name == "APOP":
        assert status == b"-ERR APOP is not available."
    else:
        check_login_answer(model, status)


def check_login_answer(model: Model, status: bytes) -> None:
    """
    USER, PASS, AUTH and SASL responses: a challenge, a login, or a refusal.
    """
    if status.startswith(b"+ "):
        assert b64decode(status[2:], validate=True) in (b"", b"Username:", b"Password:"), status
        model.sasl = True
    elif status.startswith(b"+OK Logged in"):
        count, octets = model.totals()
        assert status == f"+OK Logged in: {count} messages ({octets} octets).".encode()
        model.transaction = True
        model.logins += 1
    elif status == AUTH_FAILED:
        model.auth_failures += 1
        if model.auth_failures >= model.max_auth_failures:
            model.closed_by = status
    else:
        assert status == b"+OK" or status.startswith(b"-ERR "), status


def check_transaction(
    model: Model, name: str, argument: bytes, status: bytes, out: Transcript
) -> None:
    count, octets = model.totals()
    if name == "CAPA":
        capabilities = out.body()
        assert b"TOP" in capabilities and b"STLS" not in capabilities
    elif name == "STAT":
        assert status == f"+OK {count} {octets}".encode()
    elif name in ("LIST", "UIDL"):
        def show(n):
            return str(model.size(n)) if name == "LIST" else model.uids[n - 1]

        if argument.strip():
            number = model.usable(argument)
            expected = f"+OK {number} {show(number)}".encode() if number else None
            assert status == expected if number else status.startswith(b"-ERR "), status
        else:
            assert status == f"+OK {count} messages ({octets} octets)".encode()
            assert out.body() == [f"{n} {show(n)}".encode() for n in model.live()]
    elif name == "RETR":
        number = model.usable(argument)
        if number is None:
            assert status.startswith(b"-ERR "), status
        else:
            assert status == f"+OK {model.size(number)} octets".encode()
            assert out.body_bytes() == wire(model.messages[number - 1])
            model.retrieved.add(number)
    elif name == "TOP":
        arguments = argument.split()
        number = model.usable(arguments[0]) if len(arguments) == 2 else None
        lines = arguments[1] if len(arguments) == 2 else b""
        if number is None or not (lines.isascii() and lines.isdigit()):
            assert status.startswith(b"-ERR "), status
        else:
            assert status == b"+OK"
            count = int(lines) if len(lines) < 20 else 10**20
            assert out.body_bytes() == top(model.messages[number - 1], count)
    elif name == "DELE":
        number = model.usable(argument)
        if number is None:
            assert status.startswith(b"-ERR "), status
        else:
            assert status == f"+OK Message {number} marked to be deleted.".encode()
            model.marked.add(number)
    elif name == "RSET":
        model.marked.clear()
        count, octets = model.totals()
        assert status == f"+OK {count} messages ({octets} octets).".encode()
    elif name == "NOOP":
        assert status == b"+OK"
    elif name == "QUIT":
        assert status == f"+OK Logging out, {len(model.marked)} messages deleted.".encode()
        model.closed_by = status
        model.quit_deleted = True


AUTHORIZATION = {"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "QUIT"}
TRANSACTION = {"CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT"}


def check_transcript(
    model: Model, sent: bytes, tls_offset: int | None, output: bytes, idled: bool
) -> None:
    """
    Pair every complete line the server received with its response, in
    order, and check each response against the model.
    """
    out = Transcript(output)
    lines = client_lines(sent if tls_offset is None else sent[:tls_offset])
    index = 0
    while index < len(lines) and model.closed_by is None:
        line = lines[index]
        index += 1
        assert out.more(), f"no response to {line[:80]!r}"
        status = out.status()
        was_sasl, model.sasl = model.sasl, False
        if len(line) > model.limit:
            assert status == b"-ERR Line too long.", (line[:40], status)
        elif was_sasl:
            check_login_answer(model, status)
        else:
            keyword, _, argument = line.partition(b" ")
            name = keyword.decode("ascii", "replace").upper()
            commands = TRANSACTION if model.transaction else AUTHORIZATION
            if name not in commands:
                known = name in AUTHORIZATION | TRANSACTION
                wrong = f"{name} is not valid in this state." if known else "Unknown command."
                assert status == f"-ERR {wrong}".encode()
            elif model.transaction:
                check_transaction(model, name, argument, status, out)
            else:
                check_authorization(model, name, argument, status, out)
                if status == b"+OK Begin TLS negotiation." and tls_offset is not None:
                    # RFC 2595: what was received before the handshake is dropped.
                    lines = lines[:index] + client_lines(sent[tls_offset:])
        if BAD_INPUT.match(status):
            model.errors += 1
            if model.errors >= model.max_errors:
                assert out.status() == TOO_MANY_ERRORS
                model.closed_by = TOO_MANY_ERRORS
        else:
            assert model.errors < model.max_errors
    if model.closed_by is None and idled:
        assert out.status() == IDLE
        model.closed_by = IDLE
    assert not out.more(), f"unexpected output {out.lines[out.position:][:3]!r}"


def portal(realm: FakeRealm) -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(USER.encode(), b"secret")
    return Portal(realm, [checker])


class Worker:
    """
    A worker thread that runs the file work it is given only when told, so
    input arrives while the session waits for it.
    """

    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, f, *args) -> Deferred:
        self.jobs.append((f, args, Deferred()))
        return self.jobs[-1][2]

    def run(self) -> None:
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


def run_session(data: bytes, chunk_sizes: list[int], pauses: list[float], messages: list[bytes],
                remote: bool, tls: bool, limit: int, idle: bool, threaded: bool = False) -> None:
    """
    @param threaded: the file work is done later, as by a worker thread:
        after every other piece of input, and before time passes.
    """
    worker = Worker()
    store = MemoryMaildirs()
    for data_ in messages:
        store.deliver(USER, data_)
    before = [(m.uid, m.data) for m in store.boxes.get(USER, [])]
    realm = FakeRealm()
    session = POP3Harness(
        store,
        config=make_pop3_config(limits={"max_command_line": limit}),
        peer=REMOTE if remote else LOOPBACK,
        tls_options=TLS if tls else None,
        portal=portal(realm),
        realm=realm,
        run_blocking=worker if threaded else maybeDeferred,
    )
    assert session.greeting == b"+OK pop.test POP3 server ready.\r\n"
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    delivered = 0
    tls_offsets = []
    start_tls = session.transport.startTLS

    def record_tls(options):
        tls_offsets.append(delivered)
        start_tls(options)

    session.transport.startTLS = record_tls
    closed_at = None

    def note_close():
        nonlocal closed_at
        if session.closed and closed_at is None:
            closed_at = len(session.transport.value())

    globalLogPublisher.addObserver(observe)
    try:
        chunk = 0
        while delivered < len(data) and not session.closed:
            size = chunk_sizes[chunk % len(chunk_sizes)] if chunk_sizes else len(data)
            piece = data[delivered : delivered + size]
            delivered += len(piece)
            session.protocol.dataReceived(piece)
            note_close()
            if chunk % 2:
                worker.run()
                note_close()
            if pauses and b"\n" in piece and not session.closed:
                # Time passes only after whole lines, which restart the
                # idle timer, so the session never times out mid-stream.
                worker.run()
                session.clock.advance(pauses[chunk % len(pauses)])
                note_close()
            chunk += 1
        worker.run()
        note_close()
        if not session.closed:
            # Every delayed login answer is out: each one lets the next
            # command run, which may be a failed login answered later again.
            for _ in range(8):
                session.clock.advance(31)
                worker.run()
            note_close()
        idled = idle and not session.closed
        if idled:
            session.clock.advance(601)
            note_close()
        output = session.transport.value()
        assert closed_at is None or len(output) == closed_at, "output after the close"
        session.drop()
        gc.collect(1)  # a Deferred of this session that failed unhandled logs now
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, "\n".join(e["log_failure"].getTraceback() for e in failures)

    assert len(tls_offsets) <= 1
    model = Model(
        messages=[d for _, d in before],
        uids=[u for u, _ in before],
        limit=limit,
        max_errors=20,
        max_auth_failures=5,
        tls_offered=tls,
    )
    tls_offset = tls_offsets[0] if tls_offsets else None
    check_transcript(model, data[:delivered], tls_offset, output, idled)
    assert session.closed == (model.closed_by is not None)

    # The mailbox: unlocked, the account logged out, and only QUIT removes
    # exactly the messages marked.
    assert store.locked == set()
    assert realm.logouts == model.logins
    remaining = [(m.uid, m.data) for m in store.boxes.get(USER, [])]
    if model.quit_deleted:
        doomed = [before[n - 1][0] for n in sorted(model.marked)]
        assert store.deletions == ([(USER, doomed)] if doomed else [])
        assert remaining == [m for m in before if m[0] not in doomed]
    else:
        assert store.deletions == []
        assert remaining == before
    # Only RETR marks a message seen (TOP does not), by QUIT at the latest.
    for number, (uid, data_) in enumerate(before, 1):
        if (uid, data_) in remaining:
            seen = store.message(USER, uid).seen
            assert not seen or number in model.retrieved
            if model.quit_deleted:
                assert seen == (number in model.retrieved)


SESSION_SETTINGS = settings(max_examples=250, deadline=None)


@SESSION_SETTINGS
@given(
    st.binary(max_size=400),
    st.lists(st.integers(1, 80), max_size=6),
    st.lists(st.sampled_from([0, 0.5, 3]), max_size=3),
    st.lists(MESSAGE, max_size=3),
    LOGINS,
    st.booleans(),
    st.booleans(),
)
def test_random_bytes(data, chunk_sizes, pauses, messages, login, remote, idle):
    run_session(
        login + data,
        chunk_sizes, pauses, messages, remote, tls=True, limit=512, idle=idle,
    )


@SESSION_SETTINGS
@given(
    st.lists(st.tuples(COMMANDS, ENDINGS), max_size=25),
    st.lists(st.integers(1, 64), max_size=6),
    st.lists(st.sampled_from([0, 0, 0.5, 3]), max_size=4),
    st.lists(MESSAGE, max_size=4),
    LOGINS,
    st.booleans(),
    st.booleans(),
    st.sampled_from([512, 6000]),
    st.booleans(),
    st.booleans(),
)
def test_random_command_sequences(
    commands, chunk_sizes, pauses, messages, login, remote, tls, limit, idle, threaded
):
    data = b"".join(command + ending for command, ending in commands)
    run_session(
        login + data,
        chunk_sizes, pauses, messages, remote, tls, limit, idle, threaded,
    )


@SESSION_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.one_of(TRANSACTION_COMMANDS, TRANSACTION_COMMANDS, TRANSACTION_COMMANDS, COMMANDS),
            st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r"]),
        ),
        max_size=30,
    ),
    st.lists(st.integers(1, 64), max_size=4),
    st.lists(MESSAGE, min_size=1, max_size=4),
    st.booleans(),
)
def test_transaction_sequences(commands, chunk_sizes, messages, threaded):
    """
    Mostly well-formed TRANSACTION commands on a mailbox with messages, so
    the listings, the message bytes and the deletions are checked often
    (also with the messages read later, as by a worker thread, while more
    commands arrive).
    """
    data = b"".join(command + ending for command, ending in commands)
    run_session(LOGIN + data, chunk_sizes, [], messages, False, False, 512, False, threaded)


# What the fuzzing found.


def logged_in(limit: int = 512) -> POP3Harness:
    store = MemoryMaildirs()
    store.deliver(USER, b"Subject: one\n\nbody 1\nbody 2\n")
    session = POP3Harness(store, config=make_pop3_config(limits={"max_command_line": limit}))
    assert session.login().startswith(b"+OK Logged in")
    return session


def test_control_characters_are_not_echoed():
    # The CR went back raw, inside the -ERR line.
    session = logged_in()
    assert session.send(b"LIST \x00\rUSER bob@localhost\r\n") == (
        b"-ERR Invalid message number: \\x00\\rUSER bob@localhost\r\n"
    )


def test_numbers_of_thousands_of_digits():
    # int() raised ValueError out of dataReceived for 4,300 digits or more.
    session = logged_in(limit=6000)
    for command in (b"RETR", b"LIST", b"UIDL", b"DELE", b"TOP"):
        line = command + b" " + b"9" * 5000 + (b" 1" if command == b"TOP" else b"")
        assert session.command(line) == b"-ERR There's no such message.\r\n"
    assert session.command(b"LIST 000000000000000000000001") == b"+OK 1 32\r\n"
    whole = b"+OK\r\nSubject: one\r\n\r\nbody 1\r\nbody 2\r\n.\r\n"
    assert session.command(b"TOP 1 " + b"9" * 5000) == whole
    assert session.command(b"TOP 1 " + b"0" * 5000) == b"+OK\r\nSubject: one\r\n\r\n.\r\n"
    assert session.command(b"TOP 1 0001") == b"+OK\r\nSubject: one\r\n\r\nbody 1\r\n.\r\n"


def test_a_line_of_the_limit_whose_lf_comes_later():
    # The CR alone took the buffer over the limit: refused when split there.
    session = logged_in()
    assert session.send(b"NOOP " + b"x" * 507 + b"\r") == b""
    assert session.send(b"\n") == b"+OK\r\n"
    assert session.send(b"NOOP " + b"x" * 508 + b"\r") == b""
    assert session.send(b"\n") == b"-ERR Line too long.\r\n"


def test_a_long_line_cut_by_stls_is_forgotten():
    # The first command after the handshake was refused as too long.
    session = POP3Harness(MemoryMaildirs(), peer=REMOTE, tls_options=TLS)
    assert session.send(b"STLS\r\n" + b"x" * 600) == b"+OK Begin TLS negotiation.\r\n"
    assert session.send(b"CAPA\r\n").startswith(b"+OK Capability list follows\r\n")
