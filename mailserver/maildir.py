"""
Durable Maildir storage: delivery, listing, reading, flags, deletion, locking.

Delivery follows the Maildir protocol with the fsyncs that make it durable
(as OpenSMTPD's C{mail.maildir.c} and chasquid's C{safeio} do): the message is
written once under C{tmp/} with C{O_EXCL}, fsynced, hard-linked into each
recipient's C{new/}, and every C{new/} directory is fsynced before the caller
may answer 250.

Files are stored with LF line endings, as every Maildir reader expects.  The
file name carries both sizes, like Dovecot's: C{,S=} is the file size and
C{,W=} the size in CRLF form (what POP3 counts), so listings never open or
C{stat} a message.

No symbolic link inside the data folder is followed (L{mailserver.safe_fs}):
folders are reached from the data folder one name at a time, and files are
made, moved and read relative to those descriptors.

Everything here is blocking file I/O with no Twisted dependency; the intake
runs it in a thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zope.interface import implementer

from mailserver.interfaces import IMailbox, IMailboxStore, IStoredMessage
from mailserver.message_ids import new_message_id
from mailserver.safe_fs import open_file, open_folder, open_path, open_subfolder

_SUBDIRS = ("tmp", "new", "cur")
_LOCK_NAME = "mailserver.lock"


def file_name_host(hostname: str) -> str:
    """
    The host part of a message file's name (C{<ID>.<host>}, after Maildir's
    C{<unique>.<host>}): Maildir forbids C{/} and C{:} there, and UIDLs
    must stay short and printable, so keep a sanitised prefix.
    """
    cleaned = re.sub(r"[^A-Za-z0-9.-]", "_", hostname)
    return cleaned[:24] or "localhost"


class UniqueNames:
    """
    Unique names for files that are not an accepted message of their own
    (IMAP's APPEND, COPY, MOVE): C{<ID>.<host>}, with a new message ID
    (L{mailserver.message_ids}), so every file in a Maildir is named alike
    and tells its writer's pid.
    """

    def __init__(self, hostname: str | None = None) -> None:
        self.host = file_name_host(hostname or socket.gethostname())

    def next(self) -> str:
        return f"{new_message_id()}.{self.host}"


def ensure_maildir(base: Path, path: Path) -> None:
    """
    Create the Maildir C{path} (inside C{base}) and its C{tmp}, C{new} and
    C{cur} folders if missing, each 0700, syncing the folders that gained
    entries: a 250 may rely on them.

    @raise mailserver.safe_fs.SymlinkRefused: for a symbolic link on the way.
    """
    fd = open_folder(base, path, create=True)
    try:
        for sub in _SUBDIRS:
            os.close(open_folder(base, path / sub, create=True))
    finally:
        os.close(fd)


def free_space(path: Path) -> int:
    """
    Octets an unprivileged writer may still use on C{path}'s file system.
    """
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """
    One message being written into a C{tmp/} folder, then delivered.

    Written in the first recipient's C{tmp/} (or a spool folder when there
    is no local recipient), it is renamed into that Maildir's C{new/} and
    hard-linked into the others', so one copy serves every recipient.  All
    of this is blocking file work, meant for a worker thread.

    The folder holding C{tmp/} and C{tmp/} itself stay open from the start
    to L{deliver} or L{discard} (one of which always ends a spool file), so
    the file is made, renamed and removed where it was checked.
    """

    def __init__(self, base: Path, tmp_dir: Path, name: str, data: bytes | None = None) -> None:
        """
        @param base: the data folder, below which no link is followed.
        @param name: the file's name, unique (it starts with the message's
            ID), the same in C{tmp/} and C{new/} but for the sizes.
        @param data: the whole message (LF form), written at once and the
            file closed: one C{write} call, no buffered file object.
        """
        self._base = base
        self._tmp_dir = tmp_dir
        self.name = name
        self._file: BinaryIO | None = None
        self.size = 0
        self.lines = 0
        # Strings, not pathlib: this is every message's path.
        parent, _, tmp_name = os.fspath(tmp_dir).rpartition("/")
        self._parent_fd = open_folder(base, parent)
        try:
            self._tmp_fd = open_subfolder(self._parent_fd, tmp_name, tmp_dir)
        except BaseException:
            os.close(self._parent_fd)
            raise
        try:
            fd = open_file(self._tmp_fd, self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                           path=f"{tmp_dir}/{self.name}")
        except BaseException:
            self._close_folders()
            raise
        if data is None:
            self._file = os.fdopen(fd, "wb")
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        os.close(fd)
        self.size = len(data)
        self.lines = data.count(b"\n")

    @property
    def path(self) -> Path:
        return self._tmp_dir / self.name

    def write(self, data: bytes) -> None:
        """
        Write LF-form bytes.
        """
        self._file.write(data)
        self.size += len(data)
        self.lines += data.count(b"\n")

    @property
    def final_name(self) -> str:
        return f"{self.name},S={self.size},W={self.size + self.lines}"

    def close(self) -> None:
        """
        Close the file without syncing (a group commit syncs it later).
        """
        if self._file is not None and not self._file.closed:
            self._file.close()

    def sync(self) -> None:
        """
        Put the written bytes on stable storage and close the file.
        """
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        else:
            fd = open_file(self._tmp_fd, self.name, os.O_RDONLY, path=f"{self._tmp_dir}/{self.name}")
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def deliver(
        self, maildirs: Sequence[Path], durable: bool = True, ensure: bool = True
    ) -> list[Path]:
        """
        Move the message into every maildir's C{new/} and remove the spool
        file.  Returns the delivered paths.

        @param durable: fsync the file first and the directories after; a
            caller doing group commit syncs the file system itself instead.
        @param ensure: create missing Maildirs; a caller that knows they
            exist saves the checks.
        @raise OSError: on any failure; nothing is then reported delivered,
            though copies already made stay (at-least-once).
        """
        if durable:
            self.sync()
        else:
            self.close()
        delivered: list[Path] = []
        renamed = False
        # The file everyone else links to: here, or in the first new/ once
        # renamed there.
        source_fd, source = self._tmp_fd, self.name
        name = self.final_name
        tmp_dir = os.fspath(self._tmp_dir)
        try:
            for maildir in maildirs:
                if ensure:
                    ensure_maildir(self._base, maildir)
                new = f"{maildir}/new"
                mine = (not delivered and f"{maildir}/tmp" == tmp_dir
                        and self._parent_fd >= 0)
                if mine:  # new/ beside our tmp/
                    new_fd = open_subfolder(self._parent_fd, "new", new)
                else:
                    new_fd = open_folder(self._base, new)
                try:
                    if mine:
                        os.rename(source, name, src_dir_fd=source_fd, dst_dir_fd=new_fd)
                        renamed = True
                        source_fd, source = new_fd, name  # closed at the end
                    else:
                        os.link(source, name, src_dir_fd=source_fd, dst_dir_fd=new_fd,
                                follow_symlinks=False)
                    if durable:
                        os.fsync(new_fd)
                finally:
                    if new_fd != source_fd:
                        os.close(new_fd)
                delivered.append(Path(new, name))
        finally:
            if source_fd != self._tmp_fd:
                os.close(source_fd)
            if not renamed:
                self.discard()
            else:
                self._close_folders()
        return delivered

    def discard(self) -> None:
        """
        Remove the file; never raises, as it runs on failure paths (closing
        flushes, which fails again on a full disk).
        """
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._tmp_fd < 0:
            return  # delivered, or discarded already
        try:
            os.unlink(self.name, dir_fd=self._tmp_fd)
        except OSError:
            pass
        self._close_folders()

    def _close_folders(self) -> None:
        for fd in (self._tmp_fd, self._parent_fd):
            os.close(fd)
        self._tmp_fd = self._parent_fd = -1


@implementer(IStoredMessage)
@dataclass(frozen=True)
class MessageInfo:
    """
    One message in a mailbox, known from its file name alone.

    @ivar uid: the Maildir unique name (the part before C{,} or C{:}), stable
        across flag changes, sessions and restarts: POP3's UIDL.
    @ivar path: the file, as a string (a C{Path} per message is the largest
        cost of listing 100,000 of them).
    @ivar size: octets in CRLF form, from C{,W=} (or computed once if a
        foreign writer left it out).
    """

    uid: str
    path: str
    size: int
    seen: bool


def _info(folder: str, name: str) -> MessageInfo:
    """
    Read a message's facts from its name: C{<uid>[,S=n][,W=n][:2,FLAGS]}.
    """
    base, _, flags = name.partition(":2,")
    cut = len(base)
    for separator in (",", ":"):
        found = base.find(separator)
        if 0 <= found < cut:
            cut = found
    path = f"{folder}/{name}"
    w = base.find(",W=")
    if w >= 0:
        digits = base[w + 3 :].partition(",")[0]
        size = int(digits) if digits.isdigit() else _crlf_size(path)
    else:
        size = _crlf_size(path)
    return MessageInfo(uid=base[:cut], path=path, size=size, seen="S" in flags)


def _crlf_size(path: str) -> int:
    """
    What POP3 sends for a file whose name does not say: every stored LF
    becomes CRLF.
    """
    with os.fdopen(open_path(path), "rb") as f:
        data = f.read()
    return len(data) + data.count(b"\n")


@implementer(IMailbox)
class Mailbox:
    """
    A user's Maildir as POP3 sees it: locked, listed, read, flagged, pruned.
    """

    def __init__(self, path: Path, base: Path) -> None:
        """
        @param base: the data folder, below which no link is followed.
        """
        self.path = path
        self._base = base
        self._lock_fd: int | None = None
        # new/ and cur/ as the folder strings that message paths start with.
        self._new = os.path.join(path, "new")
        self._cur = os.path.join(path, "cur")
        # Those folders to a descriptor, while locked: a rename or unlink
        # relative to one skips resolving the whole path again, a third of a
        # rename's cost here.
        self._folder_fds: dict[str, int] = {}
        # Folders of messages removed after an IMAP session renamed them.
        self._moved_removals: set[str] = set()

    def lock(self) -> bool:
        """
        Take the exclusive mailbox lock without waiting.

        C{flock} locks belong to the open file and die with the process, so a
        crashed session never leaves a stale lock behind.
        """
        if self._lock_fd is not None:
            return True
        ensure_maildir(self._base, self.path)
        maildir = open_folder(self._base, self.path)
        try:
            fd = open_file(maildir, _LOCK_NAME, os.O_RDWR | os.O_CREAT,
                           path=self.path / _LOCK_NAME)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            self._lock_fd = fd
            try:
                for folder in (self._new, self._cur):
                    self._folder_fds[folder] = open_subfolder(
                        maildir, os.path.basename(folder), Path(folder)
                    )
            except OSError:
                self.unlock()
                raise
        finally:
            os.close(maildir)
        return True

    def unlock(self) -> None:
        for fd in self._folder_fds.values():
            os.close(fd)
        self._folder_fds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _relative(self, folder: str, name: str) -> tuple[str, int | None]:
        """
        C{name} and its folder's descriptor while locked, else the whole
        path and C{None} (which C{os} calls take as no descriptor).
        """
        fd = self._folder_fds.get(folder)
        return (name, fd) if fd is not None else (f"{folder}/{name}", None)

    def messages(self) -> list[MessageInfo]:
        """
        Every message in C{new/} and C{cur/}, oldest first: unique names
        start with the delivery time, zero-padded, so name order is delivery
        order.
        """
        found = []
        for folder in (self._new, self._cur):
            try:
                names = os.listdir(self._folder_fds.get(folder, folder))
            except FileNotFoundError:
                continue
            found.extend(_info(folder, name) for name in names if name[:1] != ".")
        found.sort(key=_by_uid)
        return found

    def open(self, info: MessageInfo) -> BinaryIO:
        return os.fdopen(self._open_message(info), "rb")

    def _open_message(self, info: MessageInfo) -> int:
        """
        The message file, for reading; a link in its place is refused.  An
        IMAP session may have renamed it since it was listed: then it is
        found again by its unique name.
        """
        try:
            return self._open_listed(info)
        except FileNotFoundError:
            return self._open_listed(self.current(info))

    def _open_listed(self, info: MessageInfo) -> int:
        name, fd = self._relative(*info.path.rsplit("/", 1))
        if fd is None:
            return open_path(name)
        return open_file(fd, name, os.O_RDONLY, path=info.path)

    def current(self, info: MessageInfo) -> MessageInfo:
        """
        Where a listed message is now: an IMAP session may have renamed it
        since (new flags, or moved from C{new/} to C{cur/}); its unique
        name stays.

        @raise FileNotFoundError: it is gone (expunged).
        """
        for folder in (self._cur, self._new):
            try:
                names = os.listdir(self._folder_fds.get(folder, folder))
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(info.uid) and name[len(info.uid) : len(info.uid) + 1] in (",", ":", ""):
                    return _info(folder, name)
        raise FileNotFoundError(info.path)

    def read_whole(self, info: MessageInfo, limit: int) -> bytes | None:
        """
        The whole file if it is smaller than C{limit} octets, else C{None}
        (stream it with L{open} instead): three system calls, no file object.
        """
        fd = self._open_message(info)
        try:
            data = os.read(fd, limit)
        finally:
            os.close(fd)
        return data if len(data) < limit else None

    def mark_seen(self, info: MessageInfo) -> None:
        """
        Move a message to C{cur/} with the C{S} flag, so every Maildir reader
        agrees it has been read.  Not synced: a crash may forget the flag,
        never the message.
        """
        if info.seen:
            return
        try:
            self._rename_seen(info)
        except FileNotFoundError:
            current = self.current(info)
            if not current.seen:
                self._rename_seen(current)

    def _rename_seen(self, info: MessageInfo) -> None:
        folder, _, name = info.path.rpartition("/")
        base, _, old_flags = name.partition(":2,")
        flags = "".join(sorted(set(old_flags) | {"S"})) if old_flags else "S"
        source, source_fd = self._relative(folder, name)
        target, target_fd = self._relative(self._cur, f"{base}:2,{flags}")
        os.rename(source, target, src_dir_fd=source_fd, dst_dir_fd=target_fd)

    def remove(self, info: MessageInfo) -> None:
        """
        Unlink a message; L{sync_removals} makes that durable.
        """
        folder, _, name = info.path.rpartition("/")
        target, fd = self._relative(folder, name)
        try:
            os.unlink(target, dir_fd=fd)
        except FileNotFoundError:
            try:  # renamed by an IMAP session since it was listed?
                current = self.current(info)
                target, fd = self._relative(*current.path.rsplit("/", 1))
                os.unlink(target, dir_fd=fd)
                self._moved_removals.add(os.path.dirname(current.path))
            except FileNotFoundError:
                pass

    def sync_removals(self, infos: Iterable[MessageInfo]) -> None:
        """
        Sync the folders L{remove} took C{infos} out of.
        """
        folders = {os.path.dirname(info.path) for info in infos} | self._moved_removals
        self._moved_removals = set()
        for folder in folders:
            fd = self._folder_fds.get(folder)
            if fd is None:
                fsync_directory(folder)
            else:
                os.fsync(fd)


def _by_uid(info: MessageInfo) -> str:
    return info.uid


@implementer(IMailboxStore)
class MaildirStore:
    """
    Every account's Maildir, found by C{path_for} (the account's canonical
    address to its folder).
    """

    def __init__(self, path_for: Callable[[str], Path], base: Path) -> None:
        """
        @param base: the data folder, below which no link is followed.
        """
        self._path_for = path_for
        self._base = base

    def mailbox(self, address: str) -> Mailbox:
        return Mailbox(self._path_for(address), self._base)
