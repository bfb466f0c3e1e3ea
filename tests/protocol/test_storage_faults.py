"""
A full or unwritable disk, injected under the real Maildir code: the client
hears 452 4.3.1 or 451 4.3.0, the session goes on, nothing already stored is
lost and nothing half-written is left behind.

The faults come from L{FaultyOS}, which stands in for the C{os} module that
L{mailserver.maildir} uses, so the intake, the spool files and the SMTP
session above them all run unchanged.  (The end-to-end version, on a real
small tmpfs, is C{tests/e2e/test_storage_full.py}.)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

import mailserver.intake
import mailserver.maildir
import mailserver.safe_fs
from mailserver.config import Config, Limits
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.maildir import Mailbox
from mailserver.smtp import SMTPDependencies, SMTPFactory
from mailserver.testing import REMOTE, InlineCommitter, SMTPHarness, make_portal, reply_codes


class _FailingFile:
    """
    A file whose writes fail once C{budget} octets have been written, as
    on a disk that fills up mid-message.
    """

    def __init__(self, real, faults: FaultyOS) -> None:
        self._real = real
        self._faults = faults

    def write(self, data) -> int:
        if self._faults.write_budget is not None:
            if len(data) > self._faults.write_budget:
                self._faults.write_budget = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self._faults.write_budget -= len(data)
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _FD:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data) -> int:
        return os.write(self._fd, data)


class FaultyOS:
    """
    The C{os} module with chosen calls failing: C{failing[name] = errno}
    makes C{os.name(...)} raise that error; C{write_budget} makes file
    writes (through C{os.write} or a file from C{os.fdopen}) run out of
    space after that many octets.
    """

    def __init__(self) -> None:
        self.failing: dict[str, int] = {}
        self.write_budget: int | None = None

    def __getattr__(self, name):
        real = getattr(os, name)
        if name in self.failing:
            code = self.failing[name]

            def fail(*args, **kwargs):
                raise OSError(code, os.strerror(code))

            return fail
        if name == "fdopen":
            return lambda *args, **kwargs: _FailingFile(real(*args, **kwargs), self)
        if name == "write":
            return lambda fd, data: _FailingFile(_FD(fd), self).write(data)
        return real


@pytest.fixture
def faults(monkeypatch):
    injected = FaultyOS()
    monkeypatch.setattr(mailserver.maildir, "os", injected)
    # Files and folders are opened there (without following links).
    monkeypatch.setattr(mailserver.safe_fs, "os", injected)
    return injected


@pytest.fixture
def server(tmp_path):
    config = Config(
        hostname="mx.test",
        data_dir=str(tmp_path / "data"),
        local_domains=("example.org",),
        limits=Limits(min_free_space=0),
    )
    accounts = accounts_for(config)
    accounts.add_user("bob@example.org", "x")
    accounts.add_user("carol@example.org", "x")

    def session() -> SMTPHarness:
        factory = SMTPFactory(SMTPDependencies.for_listener(
            role="smtp",
            hostname=config.hostname,
            smtp=config.smtp,
            limits=config.limits,
            accounts=accounts,
            portal=make_portal(),
            intake=Intake(accounts=accounts, reactor=None, data_path=config.data_path,
                          hostname=config.hostname, min_free_space=0,
                          committer=InlineCommitter()),
            tls_options=None,
            reactor=MemoryReactorClock(),
        ))
        return SMTPHarness(factory=factory, config=config, peer=REMOTE)

    session.accounts = accounts
    return session


def mailbox(accounts, address) -> list[bytes]:
    return [Path(i.path).read_bytes() for i in Mailbox(accounts.mailbox_path(address), accounts.users_path.parent).messages()]


def leftovers(accounts) -> list[str]:
    """
    Every file under a C{tmp/} folder of the data folder.
    """
    root = accounts.users_path.parent  # the data folder
    return [str(p) for p in root.rglob("tmp/*") if p.is_file()]


def send(session: SMTPHarness, body: bytes, to=("bob@example.org",)) -> list[str]:
    script = b"MAIL FROM:<a@remote.test>\r\n"
    script += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in to)
    session.send(b"EHLO c.test\r\n")
    answers = reply_codes(session.send(script + b"DATA\r\n"))
    return answers + reply_codes(session.send(body + b".\r\n"))


def test_a_disk_that_fills_mid_message_gets_452_and_keeps_what_was_stored(server, faults):
    s = server()
    assert send(s, b"Subject: first\r\n\r\nkept\r\n")[-1] == "250 2.0.0"
    faults.write_budget = 100
    answers = send(s, b"Subject: second\r\n\r\n" + (b"x" * 90 + b"\r\n") * 50)
    assert answers[-1] == "452 4.3.1"
    assert answers[:-1] == ["250 2.1.0", "250 2.1.5", "354"]
    (kept,) = mailbox(server.accounts, "bob@example.org")
    assert kept.endswith(b"Subject: first\n\nkept\n")
    assert leftovers(server.accounts) == []
    # The session goes on, and works again once there is space.
    faults.write_budget = None
    assert send(s, b"Subject: third\r\n\r\nagain\r\n")[-1] == "250 2.0.0"
    assert len(mailbox(server.accounts, "bob@example.org")) == 2


def test_a_full_disk_while_spooling_a_large_message_is_452_after_the_data(
    server, faults, monkeypatch
):
    # Large messages are written to disk as they arrive, on the reactor
    # thread: the failure shows in the middle of DATA, not at its end.
    monkeypatch.setattr(mailserver.intake, "SPILL_SIZE", 1000)
    s = server()
    faults.write_budget = 3000
    s.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    s.read()
    out = b""
    for n in range(100):
        out += s.send(b"line %d " % n + b"y" * 90 + b"\r\n")
    assert out == b""  # no early answer: the client is still sending
    assert reply_codes(s.send(b".\r\n")) == ["452 4.3.1"]
    assert not s.closed
    assert mailbox(server.accounts, "bob@example.org") == []
    assert leftovers(server.accounts) == []
    assert reply_codes(s.send(b"NOOP\r\n")) == ["250 2.0.0"]


@pytest.mark.parametrize("call, code", [("open", errno.EROFS), ("open", errno.EACCES), ("rename", errno.EROFS)])
def test_an_unwritable_data_folder_is_451(server, faults, call, code):
    s = server()
    assert send(s, b"Subject: first\r\n\r\nkept\r\n")[-1] == "250 2.0.0"
    faults.failing[call] = code
    assert send(s, b"Subject: second\r\n\r\nlost?\r\n")[-1] == "451 4.3.0"
    del faults.failing[call]
    assert [m.endswith(b"kept\n") for m in mailbox(server.accounts, "bob@example.org")] == [True]
    assert leftovers(server.accounts) == []


def test_a_failed_hard_link_for_a_second_recipient_is_a_temporary_failure(server, faults):
    # The first recipient's copy is already in place: the client is told
    # to try again, so that recipient may get the message twice, never zero
    # times (at-least-once).
    s = server()
    faults.failing["link"] = errno.ENOSPC
    answers = send(s, b"Subject: two\r\n\r\nbody\r\n", to=("bob@example.org", "carol@example.org"))
    assert answers[-1] == "452 4.3.1"
    assert mailbox(server.accounts, "carol@example.org") == []
    assert leftovers(server.accounts) == []


def test_mail_is_refused_with_452_when_the_reserve_is_not_free(tmp_path):
    config = Config(
        hostname="mx.test",
        data_dir=str(tmp_path / "data"),
        local_domains=("example.org",),
        limits=Limits(min_free_space=10**18),  # more than any disk has
    )
    accounts = accounts_for(config)
    intake = Intake(accounts=accounts, reactor=None, data_path=config.data_path,
                    hostname=config.hostname, min_free_space=config.limits.min_free_space,
                    committer=InlineCommitter())
    assert not intake.has_room(0)
    s = SMTPHarness(config=config, intake=intake)
    s.ehlo()
    assert reply_codes(s.command("MAIL FROM:<a@remote.test> SIZE=1000")) == ["452 4.3.1"]
    assert reply_codes(s.command("NOOP")) == ["250 2.0.0"]


def test_a_size_larger_than_the_free_space_is_refused_at_mail(tmp_path):
    config = Config(
        hostname="mx.test", data_dir=str(tmp_path / "data"), local_domains=("example.org",),
        limits=Limits(min_free_space=0, max_message_size=2**62),
    )
    intake = Intake(accounts=accounts_for(config), reactor=None, data_path=config.data_path,
                    hostname=config.hostname, min_free_space=config.limits.min_free_space,
                    committer=InlineCommitter())
    free = mailserver.maildir.free_space(config.data_path)
    assert intake.has_room(0)
    assert not intake.has_room(free * 2 + 2**40)
