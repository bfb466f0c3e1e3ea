"""
The durable outbound queue: what is queued, for whom, in which state.

Layout under the node's C{queue/} (C{<data_dir>/nodes/<node_name>/queue/})::

    messages/<id>        the message: for remote recipients only, from
                         memory, a whole entry (its envelope's line, then
                         the message; see below); else hard-linked from its
                         spool file, and one without an envelope (a crash
                         before the commit) is removed at a start
    envelopes/<id>.json  the envelope and per-recipient state (version 1)
    tmp/                 whole entries and envelope JSON being written
    requests/<id>.<verb> requests from the C{mailserver queue} command
    incoming/<id>        messages queued by another process (a worker), not
                         yet seen by the runner: empty and not synced, since
                         the runner reads every envelope when it starts
    corrupt/             entries set aside: <id>.json, <id> and <id>.problem

A whole entry is one file holding the envelope's line and the message
(L{mailserver.relay.whole_entry}).  Written into C{tmp/} and renamed into
C{messages/}, the rename its commit point, it costs one new file a message
instead of two (creating and removing files is most of the queue's file
system work).  Its first change of state (a deferral) is saved as an
envelope in C{envelopes/}, which then counts, and the file is marked stale
once that envelope is on disk: an ordinary message file from then on.

Any other envelope is the commit point: it is written to C{tmp/} and
renamed into C{envelopes/} after the message is linked into C{messages/}.  The intake does
both inside group commit (L{QueueStore.prepare} in the first phase,
L{QueueStore.commit} in the second), so the batch's two syncs of the file
system make them durable before the 250; L{QueueStore.enqueue} does the same
alone, with fsyncs of its own.
A message file without an envelope is the remains of a crash before the 250
and is removed at start; an envelope always has its message.  An envelope
that cannot be used (not JSON, truncated, an unknown version, wrong types, no
message file) raises L{CorruptEntry}; the runner then moves it and its
message into C{corrupt/} with a note of the problem (L{QueueStore.set_aside}),
so it is neither lost nor retried in a loop.

Everything here is blocking file I/O without Twisted: the intake calls it
in group commit's threads, the runner in worker threads and the CLI
directly.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from mailserver.envelope import Envelope
from mailserver.maildir import fsync_directory
from mailserver.message_ids import new_message_id, writer_pid
from mailserver.relay.recent_bodies import MAX_BODY, RecentBodies
from mailserver.relay.queued import (  # the queue's vocabulary: its callers import it from here
    DELIVERED,
    FAILED,
    FORMAT_VERSION,
    PENDING,
    RELAYED,
    CorruptEntry,
    QueuedMessage,
    QueueError,
    RecipientState,
    read_envelope,
)
from mailserver.relay.queue_repair import QueueRepair
from mailserver.relay.whole_entry import entry_bytes, mark_stale, read_entry
from mailserver.safe_fs import open_file, open_folder, open_path

VERBS = ("flush", "delete", "bounce")

# Names of the intake's envelope files in tmp/: the queue id is unique
# already, and the pid after it tells start-up whose file it is.
_pid = os.getpid()
_tmp_numbers = itertools.count()


def _new_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_new_pid)


def _write_new(folder_fd: int, name: str, data: bytes, durable: bool) -> None:
    """
    C{data} into the new file C{name} of an open folder (fsynced if
    C{durable}); nothing is left of it on failure.
    """
    fd = open_file(folder_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(name, dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        raise


def _unlink_all(names: list[str], folder_fd: int, problems: dict[str, Exception]) -> list[str]:
    """
    Remove the files C{names} of an open folder; those removed are returned,
    those that failed go into C{problems} (one gone already is neither).
    """
    removed = []
    for name in names:
        try:
            os.unlink(name, dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            problems[name] = e
        else:
            removed.append(name)
    return removed


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


@dataclass(frozen=True)
class Prepared:
    """
    An envelope written into C{tmp/} by L{QueueStore.prepare}, or a whole
    entry by L{QueueStore.prepare_whole} (its message has a C{data_offset}),
    not yet queued.
    """

    message: QueuedMessage
    tmp: Path
    body: bytes | None = None


class QueueStore(QueueRepair):
    """
    The queue folder; implements L{mailserver.intake.RelayQueue}.

    @ivar on_enqueued: called (in the worker thread!) with each new
        L{QueuedMessage}; the runner sets it to hand the message over to the
        reactor thread (in every process: each sends what it queued).
        Without it the id is left in C{incoming/} for the runner's next scan.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        """
        @param path: the queue folder (C{<data_dir>/queue}); no link is
            followed below its parent, the data folder.
        """
        self.path = Path(path)
        self._base = self.path.parent
        self.messages_path = self.path / "messages"
        self.envelopes_path = self.path / "envelopes"
        self.tmp_path = self.path / "tmp"
        self.requests_path = self.path / "requests"
        self.corrupt_path = self.path / "corrupt"
        self.incoming_path = self.path / "incoming"
        self._clock = clock
        self.on_enqueued: Callable[[QueuedMessage], None] | None = None
        self.recent_bodies = RecentBodies()
        self._made = False
        self._folder_fds: dict[Path, int] = {}
        self._folder_fds_lock = threading.Lock()
        self._closer = weakref.finalize(self, _close_all, self._folder_fds)

    def folder_fd(self, folder: Path) -> int:
        """
        A descriptor of one of the queue's folders, opened (under
        L{mailserver.safe_fs}'s rules) on the first call and kept until
        L{close}: every queued message is written in C{messages/} and
        C{tmp/}, and walking to them from the data folder for each message
        cost a dozen system calls.  Any thread may call it.
        """
        fd = self._folder_fds.get(folder)
        if fd is None:
            with self._folder_fds_lock:
                fd = self._folder_fds.get(folder)
                if fd is None:
                    self.ensure()
                    fd = self._folder_fds[folder] = open_folder(self._base, folder)
        return fd

    def close(self) -> None:
        """
        Close the folders L{folder_fd} kept open.
        """
        with self._folder_fds_lock:
            _close_all(self._folder_fds)

    def _write_tmp(self, name: str, data: bytes, durable: bool = True) -> str:
        """
        C{data} into a new file of C{tmp/} named for C{name} (fsynced if
        C{durable}); returns the file's name there.
        """
        # The writer's pid in the name lets start-up tell a crash's leftovers
        # from a live worker's file (see L{remove_orphans}); the number makes
        # it unique within the process (a leftover of an earlier process with
        # the same pid is stepped over).
        folder = self.folder_fd(self.tmp_path)
        for _ in range(100):
            tmp = f"{name}.{_pid}.{next(_tmp_numbers):x}"
            try:
                _write_new(folder, tmp, data, durable)
                return tmp
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name for {name} in {self.tmp_path}")

    def _write_durably(self, path: Path, text: str) -> None:
        """
        C{text} as the file C{path} (in one of the queue's folders), whole or
        not at all, and durably.
        """
        tmp = self._write_tmp(path.name, text.encode("utf-8"))
        folder = self.folder_fd(self.tmp_path)
        try:
            os.rename(tmp, path, src_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=folder)
            except FileNotFoundError:
                pass
            raise
        fsync_directory(path.parent)

    def ensure(self) -> None:
        """
        The queue's folders, made if missing (once per process).
        """
        if self._made:
            return
        # Made 0700 (and synced) if missing; a link for any is refused, and
        # the files in them are opened without following one either.
        for folder in (self.messages_path, self.envelopes_path, self.tmp_path, self.requests_path,
                       self.corrupt_path, self.incoming_path):
            os.close(open_folder(self._base, folder, create=True))
        self._made = True

    # The intake's side.

    def enqueue(
        self, envelope: Envelope, recipients: tuple[str, ...], spool: Path, body_offset: int
    ) -> str:
        """
        Durably queue C{spool} for the remote C{recipients}, under the
        message's ID; blocking.  (The
        intake uses L{prepare} and L{commit} instead, inside group commit.)

        @raise OSError: when it could not be made durable (the client then
            hears 451 and keeps the message).
        """
        prepared = self.prepare(envelope, recipients, spool, body_offset, durable=True)
        return self.commit(prepared, spool, durable=True)

    def prepare(
        self, envelope: Envelope, recipients: tuple[str, ...], spool: Path, body_offset: int,
        durable: bool = False, data: bytes | None = None,
    ) -> Prepared:
        """
        Group commit's first phase: the envelope of C{spool} (written, the
        first C{body_offset} bytes local-delivery headers) for the remote
        C{recipients}, into C{tmp/}; synced only if C{durable}, else by the
        group's sync of the file system that follows.  Blocking.

        @param data: what C{spool} holds, when the caller has it in memory:
            a small body is then kept for the first attempt
            (L{RecentBodies}), which reads no file.
        """
        self.ensure()
        size = (len(data) if data is not None else os.stat(spool).st_size) - body_offset
        message = self._queued(envelope, recipients, body_offset, size)
        tmp = self.tmp_path / self._write_tmp(self._envelope_path(message.id).name,
                                              message.to_json().encode("utf-8"), durable)
        body = None
        if data is not None and len(data) - body_offset <= MAX_BODY:
            body = data[body_offset:]
        return Prepared(message, tmp, body)

    def prepare_whole(
        self, envelope: Envelope, recipients: tuple[str, ...], data: bytes, body_offset: int,
    ) -> Prepared:
        """
        L{prepare} for a message in memory whose recipients are all remote:
        a whole entry (the envelope's line, then C{data}) into C{tmp/}, not
        synced, which L{commit} renames into C{messages/}.
        """
        self.ensure()
        message = self._queued(envelope, recipients, body_offset, len(data) - body_offset)
        entry, data_offset = entry_bytes(message, data)
        tmp = self._write_tmp(message.id, entry, durable=False)
        body = data[body_offset:] if len(data) - body_offset <= MAX_BODY else None
        return Prepared(replace(message, data_offset=data_offset), self.tmp_path / tmp, body)

    def _queued(self, envelope: Envelope, recipients: tuple[str, ...], body_offset: int,
                size: int) -> QueuedMessage:
        now = self._clock()
        queue_id = envelope.id or new_message_id()
        states = []
        for address in recipients:
            given = next((r for r in envelope.recipients if address in r.destinations), None)
            states.append(
                RecipientState(
                    address=address,
                    original=given.address if given else address,
                    orcpt=given.orcpt if given else None,
                    notify=tuple(n.upper() for n in given.notify) if given else (),
                )
            )
        return QueuedMessage(
            id=queue_id,
            sender=envelope.sender,
            recipients=tuple(states),
            arrival=now,
            body_offset=body_offset,
            size=size,
            ret=envelope.ret.upper() if envelope.ret else None,
            envid=envelope.envid,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            client_address=envelope.client_address,
            helo=envelope.helo,
            next_attempt=now,
        )

    def commit(self, prepared: Prepared, spool: Path | None, durable: bool = False) -> str:
        """
        Group commit's second phase: C{spool} hard-linked into C{messages/}
        and the envelope renamed into C{envelopes/}, the commit point; or a
        whole entry (C{spool} C{None}) renamed into C{messages/}, which the
        group's syncs alone make durable.
        Without C{durable}, the caller syncs the file system afterwards
        (both names are on stable storage before the client's 250); with
        it, the message's folder is synced before the rename and the
        envelopes' after.  On failure nothing of it is left.
        """
        message = prepared.message
        if message.data_offset:
            if durable:
                raise ValueError("a whole entry is made durable by group commit's syncs")
            try:
                os.rename(prepared.tmp.name, message.id, src_dir_fd=self.folder_fd(self.tmp_path),
                          dst_dir_fd=self.folder_fd(self.messages_path))
            except BaseException:
                self.abandon(prepared)
                raise
            return self._committed(prepared)
        message_path = self.messages_path / message.id
        try:
            os.link(spool, message_path, follow_symlinks=False)
        except BaseException:
            self.abandon(prepared)
            raise
        try:
            if durable:
                fsync_directory(self.messages_path)
            os.rename(prepared.tmp.name, self._envelope_path(message.id).name,
                      src_dir_fd=self.folder_fd(self.tmp_path),
                      dst_dir_fd=self.folder_fd(self.envelopes_path))
            if durable:
                fsync_directory(self.envelopes_path)
        except BaseException:
            os.unlink(message_path)
            self.abandon(prepared)
            raise
        return self._committed(prepared)

    def _committed(self, prepared: Prepared) -> str:
        message = prepared.message
        if prepared.body is not None:
            self.recent_bodies.keep(message.id, prepared.body)
        if self.on_enqueued is not None:
            self.on_enqueued(message)
        else:
            self.announce(message.id)
        return message.id

    def abandon(self, prepared: Prepared) -> None:
        """
        Remove what L{prepare} wrote (the sync after it failed).
        """
        try:
            os.unlink(prepared.tmp)
        except FileNotFoundError:
            pass

    def announce(self, queue_id: str) -> None:
        """
        Tell the running server's runner of a message queued by another
        process (a worker, C{mailserver queue adopt}): its next scan takes
        it in.  Best effort: a server that misses it reads it when it next
        starts.
        """
        try:
            os.close(open_path(self.incoming_path / queue_id, os.O_WRONLY | os.O_CREAT))
        except OSError:
            pass

    # The runner's and the CLI's side.

    def save(self, message: QueuedMessage) -> None:
        """
        The message's envelope, durably.  A whole entry's file is marked
        stale once the envelope is on disk (see the module's docstring).
        """
        self.ensure()
        self._write_durably(self._envelope_path(message.id), message.to_json())
        if message.data_offset:
            mark_stale(self.folder_fd(self.messages_path), message.id)

    def _envelope_path(self, queue_id: str) -> Path:
        if not queue_id or "/" in queue_id or queue_id.startswith("."):
            raise QueueError(f"{queue_id!r} is not a queue id")
        return self.envelopes_path / f"{queue_id}.json"

    def ids(self, ordered: bool = True) -> list[str]:
        """
        The ids of the envelopes and message files on disk (a message file
        may be a whole entry), in id (arrival) order unless C{ordered} is
        false (names that cannot be queue ids, such as an editor's hidden
        files, are left out).  A message file left by a crash before its
        commit is among them until start-up removes it; L{load} says it is
        not queued.
        """
        found = set(self._envelope_ids())
        try:
            found.update(n for n in os.listdir(self.messages_path) if n[0] != ".")
        except FileNotFoundError:
            pass
        ids = list(found)
        if ordered:
            ids.sort()
        return ids

    def _envelope_ids(self) -> list[str]:
        try:
            names = os.listdir(self.envelopes_path)
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if n.endswith(".json") and len(n) > 5 and n[0] != "."]

    def written_by(self, pid: int, known: Container[str]) -> list[QueuedMessage]:
        """
        The queued messages process C{pid} wrote (their ids name it) that
        are not in C{known}; those that cannot be read are left out (gone
        meanwhile, or corrupt: set aside at the next start).
        """
        loaded = []
        for queue_id in self.ids(ordered=False):
            if writer_pid(queue_id) != pid or queue_id in known:
                continue
            try:
                loaded.append(self.load(queue_id))
            except QueueError:
                continue
        return loaded

    def load(self, queue_id: str) -> QueuedMessage:
        """
        The envelope, checked, with its message file present.

        @raise CorruptEntry: when its files cannot be used.
        @raise QueueError: when no such message is queued.
        """
        path = self._envelope_path(queue_id)
        try:
            with os.fdopen(open_path(path), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            try:
                return read_entry(self.messages_path / queue_id, queue_id)
            except CorruptEntry:
                raise
            except QueueError:
                if not path.exists():
                    raise
                return self.load(queue_id)  # saved meanwhile: its envelope counts now
        except OSError as e:
            raise CorruptEntry(queue_id, path, f"cannot read it: {e.strerror or e}") from None
        message = read_envelope(raw, queue_id, path)
        try:
            info = os.stat(self.messages_path / queue_id, follow_symlinks=False)
        except FileNotFoundError:
            if not path.exists():  # removed meanwhile: not corrupt, just gone
                raise QueueError(f"no queued message {queue_id}") from None
            raise CorruptEntry(queue_id, path, "its message file is missing") from None
        except OSError as e:
            raise CorruptEntry(queue_id, path,
                               f"cannot read its message file: {e.strerror or e}") from None
        if (not stat.S_ISREG(info.st_mode) or message.data_offset < 0
                or info.st_size < message.data_offset + message.body_offset):
            raise CorruptEntry(queue_id, path, "its message file is not the message it holds")
        if message.data_offset:
            # A crash between a save's envelope and its stale mark left the
            # file a whole entry still: marked now, so no later removal
            # (the envelope first) can leave it to come back.
            try:
                mark_stale(self.folder_fd(self.messages_path), queue_id)
            except OSError:
                pass  # a reader without the right to write (the CLI): the server marks it
        return message

    def take_recent_body(self, queue_id: str) -> bytes | None:
        """
        The body of a message just queued, once (see L{RecentBodies}), or
        C{None}: then L{open_body} reads it.
        """
        return self.recent_bodies.take(queue_id)

    def open_body(self, message: QueuedMessage) -> BinaryIO:
        """
        The stored message (LF line endings) positioned after the
        local-delivery C{Return-Path:} line.
        """
        f = os.fdopen(open_path(self.messages_path / message.id), "rb")
        f.seek(message.data_offset + message.body_offset)
        return f

    def remove(self, queue_id: str) -> None:
        """
        Take a message out of the queue: the envelope first, so a crash in
        between leaves an orphan file that start-up removes, never an
        envelope without its message.
        """
        problem = self.remove_all([queue_id]).get(queue_id)
        if problem is not None:
            raise problem

    def remove_all(self, queue_ids: list[str]) -> dict[str, Exception]:
        """
        L{remove} for many messages with one fsync of the envelope folder:
        every envelope, the sync, then the message files (synced too when
        one had no envelope: a whole entry, whose removal is that of its
        file).  Returns what went wrong, by id (the others are removed).
        """
        problems: dict[str, Exception] = {}
        unlinked, gone = [], []
        self.recent_bodies.forget(queue_ids)
        envelopes = self.folder_fd(self.envelopes_path)
        for queue_id in queue_ids:
            try:
                os.unlink(self._envelope_path(queue_id).name, dir_fd=envelopes)
            except FileNotFoundError:
                gone.append(queue_id)
            except (OSError, QueueError) as e:
                problems[queue_id] = e
            else:
                unlinked.append(queue_id)
        if unlinked:
            try:
                os.fsync(envelopes)
            except OSError as e:
                problems.update((queue_id, e) for queue_id in unlinked)
                unlinked = []
        messages = self.folder_fd(self.messages_path)
        _unlink_all(unlinked, messages, problems)
        whole = _unlink_all(gone, messages, problems)
        if whole:
            try:
                os.fsync(messages)
            except OSError as e:
                problems.update((queue_id, e) for queue_id in whole)
        return problems

    def take_incoming(self) -> list[str]:
        """
        The ids other processes queued since the last call, removed from
        C{incoming/}.
        """
        try:
            names = os.listdir(self.incoming_path)
        except FileNotFoundError:
            return []
        taken = []
        for name in names:
            try:
                os.unlink(self.incoming_path / name)
            except FileNotFoundError:
                continue  # taken by a scan running at the same time
            if name and not name.startswith("."):
                taken.append(name)
        return taken

    # Requests from the CLI to the running server.

    def request(self, verb: str, target: str) -> None:
        """
        Ask the running server (or the next one to start) to act: C{verb} is
        one of L{VERBS}, C{target} a queue id, C{"domain:<name>"} or C{"*"}.
        """
        assert verb in VERBS
        self.ensure()
        name = f"{target.replace('/', '_')}.{verb}"
        self._write_durably(self.requests_path / name, f"{self._clock()}\n")

    def take_requests(self) -> list[tuple[str, str]]:
        """
        The pending requests as C{(verb, target)}, oldest first, removed.
        """
        try:
            entries = list(os.scandir(self.requests_path))
        except FileNotFoundError:
            return []
        requests = []
        for entry in sorted(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime):
            target, _, verb = entry.name.rpartition(".")
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            if verb in VERBS and target:
                requests.append((verb, target))
        return requests
