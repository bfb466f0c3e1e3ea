"""
The intake: where an accepted message becomes durable and is routed.

The SMTP server streams the message in (held in memory, or spooled to disk
when large); at the end of DATA the intake writes it once, renames it into the first local recipient's
Maildir, hard-links it into the others' and, for remote recipients, hands it
to the relay queue (a message for remote recipients only is written
straight into the queue as its message file).  Only when all of that is on stable storage does the
Deferred from L{IMessageReceiver.finish} fire and the client hear 250.  The
file work is done by a L{GroupCommitter} thread, which makes many sessions'
messages durable together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.accounts import Accounts, split_address
from mailserver.config import Limits
from mailserver.envelope import Envelope
from mailserver.group_commit import GroupCommitter
from mailserver.hooks import Delivery
from mailserver.interfaces import IIntake, IMessageReceiver
from mailserver.logs import emit
from mailserver.maildir import SpoolFile, ensure_maildir, file_name_host, free_space
from mailserver.memory_budget import MemoryBudget
from mailserver.message_ids import new_message_id
from mailserver.safe_fs import open_folder
from mailserver.safe_text import printable

# How long a reading of the free disk space is trusted (a statvfs per MAIL
# would be a system call per message for a figure that changes slowly).
_FREE_SPACE_INTERVAL = 0.5
# Messages up to this size are kept in memory until the end of DATA, while
# the memory budget (limits.memory_budget) allows.
SPILL_SIZE = 1024 * 1024


class RelayQueue(Protocol):
    """
    What the intake needs of the relay queue.
    """

    def prepare(
        self, envelope: Envelope, recipients: tuple[str, ...], spool: Path, body_offset: int,
        data: bytes | None = None,
    ):
        """
        Group commit's first phase, in its thread: write the envelope of the
        spool file (not synced) for C{recipients}, under the message's ID.
        The first C{body_offset} bytes of the file are local-delivery
        headers, not to be relayed; C{data}, when given, is what the file
        holds.
        """

    def prepare_whole(
        self, envelope: Envelope, recipients: tuple[str, ...], data: bytes, body_offset: int,
    ):
        """
        L{prepare} for a message in memory whose recipients are all remote:
        the envelope and C{data} in one file of the queue's, not synced.
        """

    def commit(self, prepared, spool: Path | None) -> str:
        """
        The second phase: queue the spool file by hard link with the
        prepared envelope, or (C{spool} C{None}) the file of
        L{prepare_whole}, not synced (the group's sync follows); the queue
        id.  On failure nothing of it is left.
        """

    def abandon(self, prepared) -> None:
        """
        Remove what L{prepare} wrote (the sync after it failed).
        """


class NoRelayQueue(Exception):
    """
    A remote recipient was accepted but this server has no relay queue.
    """


@implementer(IIntake)
class Intake:

    log = Logger()

    def __init__(
        self,
        *,
        accounts: Accounts,
        reactor,
        data_path: Path,
        hostname: str,
        min_free_space: int,
        queue: RelayQueue | None = None,
        on_delivered: Callable[[Delivery], None] | None = None,
        committer=None,
        budget: MemoryBudget | None = None,
    ) -> None:
        """
        @param data_path: the data folder: the spool is in it, and its file
            system must keep C{min_free_space} octets free.
        @param hostname: goes into the names of message files (after the
            message's ID): the node's name (C{node_name}), so servers
            sharing the data folder never make the same name and each knows
            its own files after a crash (C{file_host}).
        @param on_delivered: told of each local final delivery (the plugins'
            delivered hooks).
        @param committer: makes messages durable; by default a
            L{GroupCommitter} on the data folder.
        @param budget: the process's memory budget, which the messages being
            received share with every other buffer; by default one of
            C{limits.memory_budget}'s default size of its own.
        """
        self._accounts = accounts
        self._reactor = reactor
        self._data_path = data_path
        self._min_free_space = min_free_space
        self._committer = committer or GroupCommitter(reactor, data_path)
        self._queue = queue
        self._on_delivered = on_delivered
        self.file_host = file_name_host(hostname)
        self.budget = budget or MemoryBudget(Limits().memory_budget)
        self._maildirs_seen: set[Path] = set()  # touched by the committer threads only
        self._free = 0
        self._free_checked = -_FREE_SPACE_INTERVAL
        self.spool_path = data_path / "spool"
        os.close(open_folder(data_path, self.spool_path / "tmp", create=True))

    def begin(self, envelope: Envelope) -> IMessageReceiver:
        if not envelope.id:
            envelope = replace(envelope, id=new_message_id())
        return _Receiver(self, envelope)

    def file_name(self, envelope: Envelope) -> str:
        """
        The name of the message's file, in the Maildirs as in the spool.
        """
        return f"{envelope.id}.{self.file_host}"

    def has_room(self, size: int) -> bool:
        now = time.monotonic()
        if now - self._free_checked >= _FREE_SPACE_INTERVAL:
            try:
                self._free = free_space(self._data_path)
            except OSError:
                self._free = 0  # the data folder is gone or unreadable
            self._free_checked = now
        return self._free >= self._min_free_space + size

    def route(self, envelope: Envelope) -> tuple[list[Path], tuple[str, ...]]:
        """
        Split the destinations into local Maildirs and remote addresses.
        """
        local: dict[Path, None] = {}
        remote: dict[str, None] = {}
        for recipient in envelope.recipients:
            for destination in recipient.destinations:
                _, domain = split_address(destination)
                if self._accounts.is_local_domain(domain):
                    local[self._accounts.mailbox_path(destination)] = None
                else:
                    remote[destination] = None
        return list(local), tuple(remote)

    def _write(self, message: bytes | SpoolFile, envelope: Envelope, body_offset: int):
        """
        Group commit's first phase: the message's bytes into a C{tmp/} file,
        and its relay queue envelope if it has remote recipients, not yet
        synced.

        @param message: the whole message, or the spool file a large one
            was streamed into.
        """
        maildirs, remote = self.route(envelope)
        if remote and self._queue is None:
            if isinstance(message, SpoolFile):
                message.discard()
            raise NoRelayQueue(", ".join(remote))
        if isinstance(message, SpoolFile):
            spool = message
            try:
                spool.close()
            except BaseException:
                spool.discard()
                raise
        elif remote and not maildirs and envelope.id:
            # For remote recipients only: one file of the queue's holds the
            # envelope and the message (no spool file, no link, no removal).
            return None, maildirs, self._queue.prepare_whole(envelope, remote, message,
                                                             body_offset)
        else:
            # Written straight into the first recipient's tmp/, so delivery
            # there is one rename.
            if maildirs:
                tmp, name = maildirs[0] / "tmp", self.file_name(envelope)
            else:
                tmp, name = self.spool_path / "tmp", self.file_name(envelope)
            try:
                if maildirs:
                    self._ensure(maildirs[0])
                spool = SpoolFile(self._data_path, tmp, name, message)
            except OSError:
                self._maildirs_seen.clear()  # one was removed under us? look again next time
                raise
        prepared = None
        if remote:
            try:
                prepared = self._queue.prepare(
                    envelope, remote, spool.path, body_offset,
                    data=message if isinstance(message, bytes) else None)
            except BaseException:
                spool.discard()
                raise
        return spool, maildirs, prepared

    def _abandon(self, written) -> None:
        spool, _, prepared = written
        if spool is not None:
            spool.discard()
        if prepared is not None:
            self._queue.abandon(prepared)

    def _ensure(self, maildir: Path) -> None:
        """
        L{ensure_maildir}, checked once per Maildir and process rather than
        three C{stat} calls per message.
        """
        if maildir not in self._maildirs_seen:
            ensure_maildir(self._data_path, maildir)
            self._maildirs_seen.add(maildir)

    def _publish(self, written, envelope: Envelope) -> str:
        """
        Group commit's second phase, once the data is on disk: into the
        relay queue and every recipient's C{new/} (the group's second sync
        makes those names durable).
        """
        spool, maildirs, prepared = written
        if spool is None:
            self._queue.commit(prepared, None)
            return envelope.id
        try:
            if prepared is not None:
                self._queue.commit(prepared, spool.path)
        except BaseException:
            spool.discard()
            raise
        try:
            for maildir in maildirs:
                self._ensure(maildir)
            spool.deliver(maildirs, durable=False, ensure=False)
        except OSError:
            self._maildirs_seen.clear()
            raise
        return envelope.id

    def _delivered(self, message_id: str, envelope: Envelope, size: int) -> str:
        """
        Log each local final delivery (Postfix's C{status=sent} line of its
        local agent) and tell the plugins.
        """
        for recipient in envelope.recipients:
            for destination in recipient.destinations:
                if not self._accounts.is_local_domain(split_address(destination)[1]):
                    continue
                emit(self.log, LogLevel.info, "local.delivered", "delivered to maildir",
                     recipient=printable(destination), sender=printable(envelope.sender), size=size,
                     id=message_id)
                if self._on_delivered is not None:
                    self._on_delivered(
                        Delivery(
                            queue_id=message_id,
                            sender=envelope.sender,
                            recipient=destination,
                            status="delivered",
                            size=size,
                            envelope=envelope,
                        )
                    )
        return message_id


def _return_path(sender: str) -> bytes:
    return b"Return-Path: <" + printable(sender, None).encode("utf-8") + b">\n"


@implementer(IMessageReceiver)
class _Receiver:
    """
    Converts CRLF to LF as the pieces arrive (a CR at the end of one piece
    may pair with an LF at the start of the next) and keeps them in memory;
    a message that grows past L{SPILL_SIZE}, or arrives while the memory
    budget is spent, is streamed into a spool file instead, so memory stays
    bounded.  Nothing touches the disk on the reactor thread for the
    common, small message.
    """

    def __init__(self, intake: Intake, envelope: Envelope) -> None:
        self._intake = intake
        self._envelope = envelope
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._spool: SpoolFile | None = None
        header = _return_path(envelope.sender)
        self._body_offset = len(header)
        self._append(header)

    def write(self, data: bytes) -> None:
        # Every CR is in a CRLF (IMessageReceiver.write), so dropping them
        # all makes the LF form, even of a CRLF split between two pieces;
        # a sixth of the time that splitting at each CRLF and joining took.
        self._append(data.replace(b"\r", b""))

    def _append(self, data: bytes) -> None:
        if self._spool is not None:
            self._spool.write(data)
            return
        intake = self._intake
        if self._buffered + len(data) <= SPILL_SIZE and intake.budget.take(len(data)):
            self._pieces.append(data)
            self._buffered += len(data)
            return
        self._release_memory()
        self._spool = SpoolFile(intake._data_path, intake.spool_path / "tmp",
                                intake.file_name(self._envelope))
        for piece in self._pieces:
            self._spool.write(piece)
        self._pieces = []
        self._spool.write(data)

    def _release_memory(self) -> None:
        self._intake.budget.give_back(self._buffered)
        self._buffered = 0

    def finish(self):
        intake = self._intake
        if self._spool is not None:
            message: bytes | SpoolFile = self._spool
            size = self._spool.size
        else:
            message = b"".join(self._pieces)
            size = len(message)
            self._pieces = []
            self._release_memory()  # the committer holds it from here
        envelope, body_offset = self._envelope, self._body_offset
        d = intake._committer.submit(
            lambda: intake._write(message, envelope, body_offset),
            lambda written: intake._publish(written, envelope),
            intake._abandon,
        )
        # A failure is the caller's to log: it knows the client and the reply.
        return d.addCallback(intake._delivered, self._envelope, size - self._body_offset)

    def abort(self) -> None:
        self._pieces = []
        self._release_memory()
        if self._spool is not None:
            self._spool.discard()
