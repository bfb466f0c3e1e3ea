"""
Fakes of the server's collaborators, for the project's tests and for tests
of code built on it (plugins): a reactor and thread pool that run inline,
a group commit that does not sync, in-memory accounts and portal, an intake
that records every message, in-memory mailboxes, and harnesses that drive
one SMTP or POP3 session over a C{StringTransport} with a fake clock.
"""

from __future__ import annotations

import dataclasses
import io
from base64 import b64encode
from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.config import POP3, SMTP, Config, Limits
from mailserver.envelope import Envelope
from mailserver.interfaces import (
    IAccount,
    IAccounts,
    IIntake,
    IMailbox,
    IMailboxStore,
    IMessageReceiver,
    IStoredMessage,
)
from mailserver.login_throttle import throttle_for
from mailserver.pop3 import POP3Dependencies, POP3Factory
from mailserver.smtp import SMTPDependencies, SMTPFactory

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = IPv4Address("TCP", "203.0.113.9", 40001)


# The reactor, threads and syncing.


class InlineThreadPool:
    """
    A thread pool that runs each call at once, in the calling thread.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor(MemoryReactorClock):
    """
    A memory reactor whose thread pool and C{callFromThread} run inline, so
    code that defers blocking work to threads finishes synchronously.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pool = InlineThreadPool()

    def getThreadPool(self):
        return self._pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class InlineCommitter:
    """
    Runs a group commit's two phases at once in the calling thread, without
    syncing: for tests of code above the storage.
    """

    def submit(self, prepare, publish, abandon=None):
        return defer.maybeDeferred(lambda: publish(prepare()))


# Configuration, accounts and logins.


def make_config(**changes) -> Config:
    """
    A configuration for tests: C{mx.example.org} serving C{example.org}
    and C{localhost}; C{limits} and C{smtp} are dicts of changes to those
    sections' defaults.
    """
    limits = changes.pop("limits", {})
    smtp = changes.pop("smtp", {})
    changes.setdefault("hostname", "mx.example.org")
    changes.setdefault("local_domains", ("example.org", "localhost"))
    return Config(
        limits=dataclasses.replace(Limits(), **limits),
        smtp=dataclasses.replace(SMTP(), **smtp),
        **changes,
    )


@implementer(IAccounts)
class FakeAccounts:
    """
    The accounts over a set of users and a dict of aliases (address to
    members), with subaddresses (C{smtp.subaddress_separator}).
    """

    def __init__(self, config: Config, users=(), aliases=None) -> None:
        self.config = config
        self.users = {u.lower() for u in users}
        self.aliases = {k.lower(): tuple(v) for k, v in (aliases or {}).items()}

    @property
    def default_domain(self) -> str:
        return self.config.local_domains[0]

    def is_local_domain(self, domain: str) -> bool:
        return self.config.is_local_domain(domain)

    def _canonical(self, address: str) -> tuple[str, str]:
        local, _, domain = address.rpartition("@")
        return local.lower(), domain.lower()

    def is_relay_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.config.relay.relay_domains

    def is_relay_recipient(self, address: str) -> bool:
        return True

    def resolve(self, address: str):
        local, domain = self._canonical(address)
        if not self.is_local_domain(domain):
            return None
        full = f"{local}@{domain}"
        if full in self.aliases:
            return self.aliases[full]
        if full in self.users:
            return (full,)
        separator = self.config.smtp.subaddress_separator
        if separator and separator in local:
            base = f"{local.split(separator, 1)[0]}@{domain}"
            if base in self.users:
                return (base,)
        return None

    def exists(self, address: str) -> bool:
        return self.resolve(address) is not None

    def expand(self, address: str):
        local, domain = self._canonical(address)
        return self.aliases.get(f"{local}@{domain}")

    def owns(self, account: str, address: str) -> bool:
        local, domain = self._canonical(address)
        return account.lower() == f"{local.split('+', 1)[0]}@{domain}"


@implementer(IAccount)
@dataclass(frozen=True)
class FakeAccount:
    address: str


@implementer(IRealm)
class FakeRealm:
    """
    A L{FakeAccount} for every login; counts the logouts.
    """

    def __init__(self) -> None:
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert IAccount in interfaces
        return IAccount, FakeAccount(avatarId.decode()), self._logout

    def _logout(self) -> None:
        self.logouts += 1


def make_portal(realm: FakeRealm | None = None, /, **passwords: str) -> Portal:
    """
    A portal over these accounts' passwords (C{make_portal(**{"bob@x": "pw"})}),
    through C{realm} (by default a new L{FakeRealm}).
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user, password in passwords.items():
        checker.addUser(user.encode(), password.encode())
    return Portal(realm or FakeRealm(), [checker])


# The intake.


@dataclass
class ReceivedMessage:
    """
    One message a L{MemoryIntake} was given, as its pieces came.
    """

    envelope: Envelope
    pieces: list[bytes] = field(default_factory=list)
    finished: bool = False
    aborted: bool = False

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def body(self) -> bytes:
        """
        The message without the SMTP server's Received field (whose
        continuation lines start with a tab).
        """
        data = self.data
        assert data.startswith(b"Received: ")
        end = data.find(b"\r\n")
        while data[end + 2 : end + 3] == b"\t":
            end = data.find(b"\r\n", end + 2)
        return data[end + 2 :]


@implementer(IIntake)
class MemoryIntake:
    """
    Records every message begun, its pieces, and whether it was finished
    (under the envelope's ID, or C{Q1}, C{Q2}... without one) or aborted.  C{fail} makes C{finish} fail
    as a full disk would; C{hold} keeps its Deferred pending in C{pending};
    C{room} is what C{has_room} says.
    """

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self.fail = False
        self.hold = False
        self.room = True
        self.pending: list[defer.Deferred] = []

    @property
    def finished(self) -> list[ReceivedMessage]:
        return [m for m in self.messages if m.finished]

    def has_room(self, size: int) -> bool:
        return self.room

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        message = ReceivedMessage(envelope)
        self.messages.append(message)
        return _MemoryReceiver(self, message)


@implementer(IMessageReceiver)
class _MemoryReceiver:
    def __init__(self, intake: MemoryIntake, message: ReceivedMessage) -> None:
        self._intake = intake
        self._message = message

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes) and not self._message.aborted
        self._message.pieces.append(data)

    def finish(self):
        assert not self._message.aborted
        if self._intake.fail:
            return defer.fail(OSError("disk full"))
        self._message.finished = True
        queue_id = self._message.envelope.id or f"Q{len(self._intake.finished)}"
        if self._intake.hold:
            d: defer.Deferred = defer.Deferred()
            self._intake.pending.append(d)
            d.addCallback(lambda _: queue_id)
            return d
        return defer.succeed(queue_id)

    def abort(self) -> None:
        self._message.aborted = True


# An SMTP session.


class TLSStringTransport(StringTransport):
    """
    Records C{startTLS}, as a real transport does it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started_with = None

    def startTLS(self, options) -> None:
        self.tls_started_with = options


class SMTPHarness:
    """
    One SMTP session over a L{TLSStringTransport} with a fake clock:
    C{send} bytes, get back what the server wrote since.  By default an MX
    listener (no AUTH unless C{smtp.mx_auth}: give C{role="submission"})
    for C{example.org}, users bob, alice and jürgen, a list
    C{list@example.org}, and bob's password C{secret}; give C{factory} to
    open another session on the same listener.
    """

    def __init__(
        self,
        *,
        role: str = "smtp",
        peer=REMOTE,
        config: Config | None = None,
        tls_options=None,
        implicit_tls: bool = False,
        users=("bob@example.org", "alice@example.org", "jürgen@example.org"),
        aliases=None,
        passwords=None,
        hooks=None,
        queue_runner=None,
        intake=None,
        factory=None,
    ) -> None:
        self.config = config or make_config()
        self.clock = MemoryReactorClock()
        self.intake = intake if intake is not None else MemoryIntake()
        if aliases is None:
            aliases = {"list@example.org": ("bob@example.org", "alice@example.org")}
        self.accounts = FakeAccounts(self.config, users, aliases)
        self.factory = factory or SMTPFactory(SMTPDependencies.for_listener(
            role=role,
            hostname=self.config.hostname,
            smtp=self.config.smtp,
            limits=self.config.limits,
            accounts=self.accounts,
            portal=make_portal(**(passwords or {"bob@example.org": "secret"})),
            intake=self.intake,
            tls_options=tls_options,
            reactor=self.clock,
            implicit_tls=implicit_tls,
            hooks=hooks,
            queue_runner=queue_runner,
        ))
        if factory is not None:
            self.intake = factory.dependencies.intake
            self.clock = factory.dependencies.clock
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = self.factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.read()

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.protocol.dataReceived(data)
        return self.read()

    def command(self, line: str) -> bytes:
        return self.send(line + "\r\n")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def ehlo(self) -> bytes:
        return self.command("EHLO client.example.net")

    def login(self, user: str = "bob@example.org", password: str = "secret") -> bytes:
        token = b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def reply_codes(replies: bytes) -> list[str]:
    """
    The code and enhanced code of each final reply line, e.g. C{"250 2.1.0"}.
    """
    out = []
    for line in replies.decode("utf-8").split("\r\n"):
        if len(line) > 3 and line[3] == " ":
            parts = line.split(" ")
            if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1]:
                out.append(f"{parts[0]} {parts[1]}")
            else:
                out.append(parts[0])
    return out


# Mailboxes and a POP3 session.


@implementer(IStoredMessage)
@dataclass(frozen=True)
class MemoryMessageInfo:
    uid: str
    size: int
    seen: bool


@dataclass
class StoredMessage:
    uid: str
    data: bytes  # LF line endings, as in a real Maildir
    seen: bool = False

    @property
    def size(self) -> int:
        return len(self.data) + self.data.count(b"\n")


@implementer(IMailboxStore)
@dataclass
class MemoryMaildirs:
    """
    Every account's messages, the locks held, the removals synced, and
    switches that make the next storage call fail.
    """

    boxes: dict[str, list[StoredMessage]] = field(default_factory=dict)
    locked: set[str] = field(default_factory=set)
    deletions: list[tuple[str, list[str]]] = field(default_factory=list)
    fail_lock: bool = False
    fail_listing: bool = False
    fail_open: bool = False
    fail_delete: bool = False

    def deliver(self, address: str, data: bytes, uid: str | None = None) -> None:
        box = self.boxes.setdefault(address, [])
        box.append(StoredMessage(uid or f"1700000000.M{len(box)}P1Q1.test", data))

    def mailbox(self, address: str) -> MemoryMailbox:
        return MemoryMailbox(self, address)

    def message(self, address: str, uid: str) -> StoredMessage:
        return next(m for m in self.boxes[address] if m.uid == uid)


@implementer(IMailbox)
class MemoryMailbox:
    """
    One account's messages in a L{MemoryMaildirs}, with the contract of
    L{mailserver.maildir.Mailbox}.
    """

    def __init__(self, store: MemoryMaildirs, address: str) -> None:
        self._store = store
        self._address = address
        self._holding = False

    def lock(self) -> bool:
        if self._store.fail_lock:
            raise OSError("disk on fire")
        if self._holding:
            return True
        if self._address in self._store.locked:
            return False
        self._store.locked.add(self._address)
        self._holding = True
        return True

    def unlock(self) -> None:
        if self._holding:
            self._store.locked.discard(self._address)
            self._holding = False

    def messages(self) -> list[MemoryMessageInfo]:
        if self._store.fail_listing:
            raise OSError("cannot list")
        return [
            MemoryMessageInfo(uid=m.uid, size=m.size, seen=m.seen)
            for m in self._store.boxes.get(self._address, [])
        ]

    def open(self, message: MemoryMessageInfo) -> io.BytesIO:
        return io.BytesIO(self._data(message))

    def read_whole(self, message: MemoryMessageInfo, limit: int) -> bytes | None:
        data = self._data(message)
        return data if len(data) < limit else None

    def _data(self, message: MemoryMessageInfo) -> bytes:
        if self._store.fail_open:
            raise OSError(5, "Input/output error", message.uid)
        if not any(m.uid == message.uid for m in self._store.boxes.get(self._address, [])):
            raise FileNotFoundError(message.uid)  # removed meanwhile (by IMAP...)
        return self._store.message(self._address, message.uid).data

    def mark_seen(self, message: MemoryMessageInfo) -> None:
        self._store.message(self._address, message.uid).seen = True

    def remove(self, message: MemoryMessageInfo) -> None:
        if self._store.fail_delete:
            raise OSError("read-only file system")
        box = self._store.boxes.get(self._address, [])
        box[:] = [m for m in box if m.uid != message.uid]

    def sync_removals(self, messages: Iterable[MemoryMessageInfo]) -> None:
        self._store.deletions.append((self._address, [m.uid for m in messages]))


def make_pop3_config(limits: dict | None = None, **pop3) -> Config:
    """
    A configuration for POP3 tests: C{pop.test}, with these changes to the
    C{limits} and C{pop3} sections' defaults.
    """
    return Config(hostname="pop.test", limits=Limits(**(limits or {})), pop3=POP3(**pop3))


def _all_at_once(steps) -> defer.Deferred:
    return defer.maybeDeferred(lambda: [None for _ in steps])


class POP3Harness:
    """
    One POP3 session over a L{TLSStringTransport} with a fake clock: C{send}
    bytes, get back what the server wrote since.  By default a loopback
    client, the accounts C{bob@localhost} (password C{secret}) and
    C{carol@localhost} (C{pass word}), and file work done at once.
    """

    def __init__(
        self,
        store: MemoryMaildirs,
        config: Config | None = None,
        peer=LOOPBACK,
        tls_options: object = None,
        implicit_tls: bool = False,
        portal: Portal | None = None,
        clock: Clock | None = None,
        realm: FakeRealm | None = None,
        factory: POP3Factory | None = None,
        sliced: bool = False,
        run_blocking=defer.maybeDeferred,
    ) -> None:
        """
        @param factory: another session's factory, for a second connection
            to the same server; the other arguments but C{peer} are then
            ignored.
        @param sliced: QUIT's file steps run a slice per C{clock} turn, as
            in the server, instead of all at once.
        @param run_blocking: runs the file work meant for a worker thread;
            by default at once.
        """
        self.store = store
        self.realm = realm or FakeRealm()
        if factory is None:
            config = config or make_pop3_config()
            clock = clock or Clock()
            factory = POP3Factory(POP3Dependencies.for_listener(
                hostname=config.hostname,
                pop3=config.pop3,
                limits=config.limits,
                portal=portal or make_portal(
                    self.realm, **{"bob@localhost": "secret", "carol@localhost": "pass word"}
                ),
                mailboxes=store,
                login_throttle=throttle_for(config.limits, clock),
                tls_options=tls_options,
                reactor=clock,
                implicit_tls=implicit_tls,
                run_blocking=run_blocking,
                run_in_slices=None if sliced else _all_at_once,
            ))
        self.factory = factory
        self.clock = factory.dependencies.clock
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        written = self.transport.value()
        self.transport.clear()
        return written

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.take()

    def command(self, line: str | bytes) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        return self.send(line + b"\r\n")

    def login(self, user: str = "bob@localhost", password: str = "secret") -> bytes:
        assert self.command(f"USER {user}") == b"+OK\r\n"
        return self.command(f"PASS {password}")

    def drop(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

