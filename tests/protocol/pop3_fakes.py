"""
An in-memory Maildir store following C{mailserver.maildir.Mailbox}'s
contract, and a harness that drives one POP3 session over a StringTransport
with a fake clock.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.config import POP3, Config, Limits
from mailserver.interfaces import IAccount
from mailserver.maildir import MessageInfo
from mailserver.pop3 import POP3Factory

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = IPv4Address("TCP", "10.0.0.1", 1234)


@dataclass
class StoredMessage:
    uid: str
    data: bytes  # LF line endings, as in a real Maildir
    seen: bool = False

    @property
    def size(self) -> int:
        return len(self.data) + self.data.count(b"\n")


@dataclass
class MemoryMaildirs:
    """
    Every account's messages, the locks held, and switches that make the
    next storage call fail.
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

    def mailbox_for(self, address: str) -> MemoryMailbox:
        return MemoryMailbox(self, address)

    def message(self, address: str, uid: str) -> StoredMessage:
        return next(m for m in self.boxes[address] if m.uid == uid)


class MemoryMailbox:
    def __init__(self, store: MemoryMaildirs, address: str) -> None:
        self._store = store
        self._address = address
        self._holding = False

    def _path(self, message: StoredMessage) -> Path:
        if message.seen:
            return Path("/memory", self._address, "cur", f"{message.uid}:2,S")
        return Path("/memory", self._address, "new", message.uid)

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

    def messages(self) -> list[MessageInfo]:
        if self._store.fail_listing:
            raise OSError("cannot list")
        return [
            MessageInfo(uid=m.uid, path=self._path(m), size=m.size, seen=m.seen)
            for m in self._store.boxes.get(self._address, [])
        ]

    def open(self, info: MessageInfo) -> io.BytesIO:
        if self._store.fail_open:
            raise FileNotFoundError(str(info.path))
        return io.BytesIO(self._store.message(self._address, info.uid).data)

    def read_whole(self, info: MessageInfo, limit: int) -> bytes | None:
        data = self.open(info).read()
        return data if len(data) < limit else None

    def mark_seen(self, info: MessageInfo) -> None:
        self._store.message(self._address, info.uid).seen = True

    def remove(self, info: MessageInfo) -> None:
        if self._store.fail_delete:
            raise OSError("read-only file system")
        box = self._store.boxes.get(self._address, [])
        box[:] = [m for m in box if m.uid != info.uid]

    def sync_removals(self, infos: Iterable[MessageInfo]) -> None:
        self._store.deletions.append((self._address, [info.uid for info in infos]))


def _all_at_once(steps) -> defer.Deferred:
    return defer.maybeDeferred(lambda: [None for _ in steps])


@dataclass(frozen=True)
class Account:
    address: str


@implementer(IRealm)
class AccountRealm:
    def __init__(self) -> None:
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert IAccount in interfaces
        return IAccount, Account(avatarId.decode()), self._logout

    def _logout(self) -> None:
        self.logouts += 1


class TLSStringTransport(StringTransport):
    """
    Records C{startTLS}; no real handshake.
    """

    tls_options: object = None

    def startTLS(self, options) -> None:
        self.tls_options = options


def make_config(limits: dict | None = None, **pop3) -> Config:
    return Config(hostname="pop.test", limits=Limits(**(limits or {})), pop3=POP3(**pop3))


class Session:
    """
    One POP3 connection: C{send} feeds bytes and returns what the server
    wrote in response.
    """

    def __init__(
        self,
        store: MemoryMaildirs,
        config: Config | None = None,
        peer: IPv4Address = LOOPBACK,
        tls_options: object = None,
        implicit_tls: bool = False,
        portal: Portal | None = None,
        clock: Clock | None = None,
        realm: AccountRealm | None = None,
        factory: POP3Factory | None = None,
        sliced: bool = False,
    ) -> None:
        """
        @param factory: another session's factory, for a second connection
            to the same server; the other arguments but C{peer} are then
            ignored.
        @param sliced: QUIT's file steps run a slice per C{clock} turn, as
            in the server, instead of all at once.
        """
        self.store = store
        self.realm = realm or AccountRealm()
        if factory is not None:
            self.factory = factory
            self.clock = factory.reactor
        else:
            self.clock = clock or Clock()
            self.factory = self._make_factory(
                store, config, portal, tls_options, implicit_tls, sliced
            )
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = self.factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def _make_factory(
        self, store, config, portal, tls_options, implicit_tls, sliced
    ) -> POP3Factory:
        if portal is None:
            portal = Portal(self.realm)
            checker = InMemoryUsernamePasswordDatabaseDontUse()
            checker.addUser(b"bob@localhost", b"secret")
            checker.addUser(b"carol@localhost", b"pass word")
            portal.registerChecker(checker)
        return POP3Factory(
            config=config or make_config(),
            portal=portal,
            mailbox_for=store.mailbox_for,
            tls_options=tls_options,
            reactor=self.clock,
            implicit_tls=implicit_tls,
            run_blocking=defer.maybeDeferred,
            run_in_slices=None if sliced else _all_at_once,
        )

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
