"""
In-memory accounts, portal and intake for the SMTP protocol tests, and a
harness that drives one session over a StringTransport with a fake clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from mailserver.config import SMTP, Config, Limits
from mailserver.envelope import Envelope
from mailserver.interfaces import IAccount, IIntake, IMessageReceiver
from mailserver.smtp import SMTPFactory

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = IPv4Address("TCP", "203.0.113.9", 40001)


class FakeAccounts:
    """
    The C{mailserver.accounts.Accounts} contract over two dicts.
    """

    def __init__(self, config: Config, users=(), aliases=None) -> None:
        self.config = config
        self.users = {u.lower() for u in users}
        self.aliases = {k.lower(): tuple(v) for k, v in (aliases or {}).items()}

    def _canonical(self, address: str) -> tuple[str, str]:
        local, _, domain = address.rpartition("@")
        return local.lower(), domain.lower()

    def is_relay_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.config.relay.relay_domains

    def is_relay_recipient(self, address: str) -> bool:
        return True

    def resolve(self, address: str):
        local, domain = self._canonical(address)
        if not self.config.is_local_domain(domain):
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
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user, password in passwords.items():
        checker.addUser(user.encode(), password.encode())
    return Portal(FakeRealm(), [checker])


@dataclass
class Stored:
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
        The message without our Received field (its continuation lines start
        with a tab).
        """
        data = self.data
        assert data.startswith(b"Received: ")
        end = data.find(b"\r\n")
        while data[end + 2 : end + 3] == b"\t":
            end = data.find(b"\r\n", end + 2)
        return data[end + 2 :]


@implementer(IIntake)
class RecordingIntake:
    """
    Records every message begun, its pieces, and whether it was finished or
    aborted.  C{fail} makes C{finish} fail; C{hold} keeps its Deferred
    pending in C{pending}.
    """

    def __init__(self) -> None:
        self.messages: list[Stored] = []
        self.fail = False
        self.hold = False
        self.room = True
        self.pending: list[defer.Deferred] = []

    @property
    def finished(self) -> list[Stored]:
        return [m for m in self.messages if m.finished]

    def has_room(self, size: int) -> bool:
        return self.room

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        stored = Stored(envelope)
        self.messages.append(stored)
        return _Receiver(self, stored)


@implementer(IMessageReceiver)
class _Receiver:
    def __init__(self, intake: RecordingIntake, stored: Stored) -> None:
        self._intake = intake
        self._stored = stored

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes) and not self._stored.aborted
        self._stored.pieces.append(data)

    def finish(self):
        assert not self._stored.aborted
        if self._intake.fail:
            return defer.fail(OSError("disk full"))
        self._stored.finished = True
        queue_id = f"Q{len(self._intake.finished)}"
        if self._intake.hold:
            d = defer.Deferred()
            self._intake.pending.append(d)
            d.addCallback(lambda _: queue_id)
            return d
        return defer.succeed(queue_id)

    def abort(self) -> None:
        self._stored.aborted = True


class TLSStringTransport(StringTransport):
    """
    Records C{startTLS} and afterwards claims TLS, as a real transport does.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started_with = None

    def startTLS(self, options) -> None:
        self.tls_started_with = options


def make_config(**changes) -> Config:
    limits = changes.pop("limits", {})
    smtp = changes.pop("smtp", {})
    changes.setdefault("hostname", "mx.example.org")
    changes.setdefault("local_domains", ("example.org", "localhost"))
    return Config(
        limits=dataclasses.replace(Limits(), **limits),
        smtp=dataclasses.replace(SMTP(), **smtp),
        **changes,
    )


class Session:
    """
    One SMTP session: C{send} bytes, get back what the server wrote since.
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
        factory: SMTPFactory | None = None,
        greet: bool = True,
    ) -> None:
        self.config = config or make_config()
        self.clock = MemoryReactorClock()
        self.intake = RecordingIntake()
        self.accounts = FakeAccounts(
            self.config, users, aliases if aliases is not None else {"list@example.org": ("bob@example.org", "alice@example.org")}
        )
        self.factory = factory or SMTPFactory(
            config=self.config,
            role=role,
            accounts=self.accounts,
            portal=make_portal(**(passwords or {"bob@example.org": "secret"})),
            intake=self.intake,
            tls_options=tls_options,
            reactor=self.clock,
            implicit_tls=implicit_tls,
            hooks=hooks,
            queue_runner=queue_runner,
        )
        if factory is not None:
            self.intake = factory.intake
            self.clock = factory.reactor
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
        from base64 import b64encode

        token = b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


def codes(replies: bytes) -> list[str]:
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
