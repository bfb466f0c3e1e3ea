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

Everything here is blocking file I/O with no Twisted dependency; the intake
runs it in a thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailserver.message_ids import writer_pid

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


# The writer's process id in a unique name of an earlier version,
# C{<seconds>.M<usec>P<pid>Q<n>.<host>}.
_OLD_WRITER_PID = re.compile(r"^\d+\.M\d+P(\d+)Q\d+\.")
# Maildir's rule for files in tmp/ of unknown origin (qmail's maildir(5)).
STALE_TMP_SECONDS = 36 * 3600


def writer_alive(pid: int) -> bool:
    """
    At start-up: may the process that wrote a temporary file still be
    writing it?  Not if it is gone, nor if it has our pid (an earlier
    process's, since this one has written nothing yet).
    """
    if pid == os.getpid():
        return False  # at start-up this process has written nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: str, now: float | None = None) -> int:
    """
    Remove what a crash left in a C{tmp/} folder: files written by a
    process that is gone (never acknowledged, so nobody is owed them), and
    any file older than 36 hours.  Files of live processes (a worker still
    writing) are kept.  Meant for start-up; returns how many went.
    """
    cutoff = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            writer = _writer(entry.name)
            if (writer is not None and not writer_alive(writer)) or (
                entry.stat(follow_symlinks=False).st_mtime < cutoff
            ):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _writer(name: str) -> int | None:
    """
    The process id of the writer of a file named by L{Intake}'s rule (or by
    an earlier version's), or C{None} when the name does not tell.
    """
    pid = writer_pid(name)
    if pid is not None:
        return pid
    old = _OLD_WRITER_PID.match(name)
    return int(old.group(1)) if old else None


def ensure_maildir(path: Path) -> None:
    """
    Create C{path} and its C{tmp}, C{new} and C{cur} folders if missing, and
    fsync the directories that gained entries.
    """
    if all((path / sub).is_dir() for sub in _SUBDIRS):
        return
    for sub in _SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True)
    # New directory entries must be durable too before any 250 relies on them.
    for folder in (path, path.parent, path.parent.parent):
        fsync_directory(folder)


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
    """

    def __init__(self, tmp_dir: Path, name: str, data: bytes | None = None) -> None:
        """
        @param name: the file's name, unique (it starts with the message's
            ID), the same in C{tmp/} and C{new/} but for the sizes.
        @param data: the whole message (LF form), written at once and the
            file closed: one C{write} call, no buffered file object.
        """
        self._tmp_dir = tmp_dir
        self.name = name
        self.path = tmp_dir / self.name
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO | None = None
        self.size = 0
        self.lines = 0
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
            fd = os.open(self.path, os.O_RDONLY)
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
        try:
            for maildir in maildirs:
                if ensure:
                    ensure_maildir(maildir)
                target = maildir / "new" / self.final_name
                if not delivered and maildir / "tmp" == self._tmp_dir:
                    os.rename(self.path, target)
                    renamed = True
                else:
                    os.link(delivered[0] if delivered else self.path, target)
                delivered.append(target)
            if durable:
                for target in delivered:
                    fsync_directory(target.parent)
        finally:
            if not renamed:
                self.discard()
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
        try:
            os.unlink(self.path)
        except OSError:
            pass


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
    with open(path, "rb") as f:
        data = f.read()
    return len(data) + data.count(b"\n")


class Mailbox:
    """
    A user's Maildir as POP3 sees it: locked, listed, read, flagged, pruned.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        # new/ and cur/ as the folder strings that message paths start with.
        self._new = os.path.join(path, "new")
        self._cur = os.path.join(path, "cur")
        # Those folders to a descriptor, while locked: a rename or unlink
        # relative to one skips resolving the whole path again, a third of a
        # rename's cost here.
        self._folder_fds: dict[str, int] = {}

    def lock(self) -> bool:
        """
        Take the exclusive mailbox lock without waiting.

        C{flock} locks belong to the open file and die with the process, so a
        crashed session never leaves a stale lock behind.
        """
        if self._lock_fd is not None:
            return True
        ensure_maildir(self.path)
        fd = os.open(self.path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
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
                self._folder_fds[folder] = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self.unlock()
            raise
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
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            found.extend(_info(folder, name) for name in names if name[:1] != ".")
        found.sort(key=_by_uid)
        return found

    def open(self, info: MessageInfo) -> BinaryIO:
        return open(info.path, "rb")

    def read_whole(self, info: MessageInfo, limit: int) -> bytes | None:
        """
        The whole file if it is smaller than C{limit} octets, else C{None}
        (stream it with L{open} instead): three system calls, no file object.
        """
        fd = os.open(info.path, os.O_RDONLY)
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
            pass

    def sync_removals(self, infos: Iterable[MessageInfo]) -> None:
        """
        Sync the folders L{remove} took C{infos} out of.
        """
        for folder in {os.path.dirname(info.path) for info in infos}:
            fsync_directory(folder)


def _by_uid(info: MessageInfo) -> str:
    return info.uid
