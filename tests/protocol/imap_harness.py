"""
One IMAP session over a C{StringTransport} with a fake clock, on a real
folder store in a temporary folder whose file work runs inline (or when
the test says, as a worker thread would run it later).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone

from mailserver.folders.store import MailStore
from mailserver.folders.watch import NoWatcher
from mailserver.imap import IMAPDependencies, IMAPFactory
from mailserver.login_throttle import throttle_for
from mailserver.safe_fs import anonymous_file
from mailserver.testing import LOOPBACK, TLSStringTransport, make_config, make_portal


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class Later:
    """
    Runs blocking calls only when told, as worker threads would.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            defer.maybeDeferred(f, *args).chainDeferred(d)


class IMAPHarness:
    """
    C{send} bytes, get back what the server wrote since.  Account
    C{bob@example.org} (password C{secret}) has its Maildir at
    C{<root>/mail/bob@example.org}.
    """

    def __init__(
        self,
        root: Path,
        *,
        peer=LOOPBACK,
        tls_options=None,
        implicit_tls: bool = False,
        config=None,
        store: MailStore | None = None,
        run_blocking=inline,
        clock=None,
        login_throttle=None,
        factory=None,
        budget=None,
        open_spill=None,
    ) -> None:
        self.root = root
        (root / "spool").mkdir(parents=True, exist_ok=True)
        self.clock = clock or MemoryReactorClock()
        self.config = config or make_config(data_dir=str(root / "data"))
        self.store = store or MailStore(
            lambda address: root / "mail" / address, root, run_blocking, self.clock, NoWatcher(), "host"
        )
        if factory is None:
            config = self.config
            deps = IMAPDependencies.for_listener(
                hostname=config.hostname,
                imap=config.imap,
                limits=config.limits,
                portal=make_portal(**{"bob@example.org": "secret", "alice@example.org": "wonder"}),
                store=self.store,
                login_throttle=login_throttle or throttle_for(config.limits, self.clock),
                open_spill=open_spill or partial(anonymous_file, root, root / "spool"),
                tls_options=tls_options,
                reactor=self.clock,
                implicit_tls=implicit_tls,
                budget=budget,
                run_blocking=run_blocking,
            )
            factory = IMAPFactory(deps)
        self.factory = factory
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.read()

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / "bob@example.org"

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

    def login(self) -> bytes:
        return self.command("L LOGIN bob@example.org secret")

    def select(self, name: str = "INBOX") -> bytes:
        self.login()
        return self.command(f"S SELECT {name}")

    def deliver(self, name: str, data: bytes = b"Subject: hi\n\nbody\n", folder: str = "") -> Path:
        """
        A message put into C{new/} as the intake does (LF line ends).
        """
        base = self.maildir / folder if folder else self.maildir
        for sub in ("tmp", "new", "cur"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        size = len(data)
        lines = data.count(b"\n")
        path = base / "new" / f"{name},S={size},W={size + lines}"
        path.write_bytes(data)
        return path

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def tagged(output: bytes, tag: str) -> str:
    """
    The tagged response line of C{tag}.
    """
    for line in output.decode("utf-8", "replace").split("\r\n"):
        if line.startswith(tag + " "):
            return line
    raise AssertionError(f"no response tagged {tag} in {output!r}")


def untagged(output: bytes) -> list[str]:
    return [
        line[2:] for line in output.decode("utf-8", "replace").split("\r\n") if line.startswith("* ")
    ]
