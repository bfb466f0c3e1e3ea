"""
Fakes of the server's collaborators, for the project's tests and for tests
of code built on it (plugins): a reactor and thread pool that run inline,
a group commit that does not sync, in-memory accounts and portal, an intake
that records every message, and a harness that drives one SMTP session over
a C{StringTransport} with a fake clock.
"""

from __future__ import annotations

import dataclasses
from base64 import b64encode
from dataclasses import dataclass, field

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.config import SMTP, Config, Limits
from mailserver.envelope import Envelope
from mailserver.interfaces import IAccount, IAccounts, IIntake, IMessageReceiver
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
    def requestAvatar(self, avatarId, mind, *interfaces):
        return IAccount, FakeAccount(avatarId.decode()), lambda: None


def make_portal(**passwords: str) -> Portal:
    """
    A portal over these accounts' passwords (C{make_portal(**{"bob@x": "pw"})}).
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user, password in passwords.items():
        checker.addUser(user.encode(), password.encode())
    return Portal(FakeRealm(), [checker])


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
    listener for C{example.org}, users bob, alice and jürgen, a list
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
