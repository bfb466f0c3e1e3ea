"""
Noticing that a folder changed on disk, so a session in IDLE hears of a
delivery (or of another process's expunge or flag change) within a
second: inotify on the folder's C{new/} and C{cur/} where the system has
it, else a look every half second (a folder's scan returns at once when
the directories' times say nothing changed).

Inotify sees every writer, whatever process it is: the intake of this
process or of a worker, POP3, another IMAP process, a local mail client.
Each event names the file, so a folder can tell the renames and unlinks it
made itself (every flag change is two events) from those of others, and
look at the disk again only for the latter.

The inotify reader here is a plain reactor reader over the system calls
(by C{ctypes}), not C{twisted.internet.inotify}: measured with four IMAP
clients reading their mail, Twisted's made a C{FilePath} per event, and
handling the events of the server's own C{\\Seen} renames took an eighth
of its CPU time.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

POLL_INTERVAL = 0.5
_SUBDIRS = ("new", "cur")

# inotify(7)
IN_MODIFY = 0x2
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
APPEARED = IN_CREATE | IN_MOVED_TO
GONE = IN_DELETE | IN_MOVED_FROM
_MASK = APPEARED | GONE
# A watch is never put on what a link in place of C{new/} or C{cur/} points
# to.  inotify takes a path, so the folders above are resolved by the
# kernel; a link swapped in there after the folder was opened could aim a
# watch elsewhere, which only makes the folder look again: every look goes
# through L{mailserver.folders.disk.FolderFiles}, which follows no link.
_WATCH = _MASK | IN_ONLYDIR | IN_DONT_FOLLOW
_EVENT = struct.Struct("=iIII")

# changed(subdir, name, mask): one event; changed(None, None, 0): look
# again, something may have changed.
Changed = Callable[[str | None, bytes | None, int], None]


@implementer(IReadDescriptor)
class InotifyWatcher:
    log = Logger()

    def __init__(self, reactor) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._remove = libc.inotify_rm_watch
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._fd = fd
        self._reactor = reactor
        self._watches: dict[int, tuple[str, Changed]] = {}
        self._by_path: dict[str, list[int]] = {}
        reactor.addReader(self)

    def watch(self, path: str, changed: Changed) -> None:
        wds = []
        for sub in _SUBDIRS:
            wd = self._add(self._fd, os.fsencode(f"{path}/{sub}"), _WATCH)
            if wd < 0:  # gone, or out of watches: the folder is still scanned at each command
                self.log.warn("cannot watch {path}: {e}", path=f"{path}/{sub}",
                              e=os.strerror(ctypes.get_errno()), event="folders.watch_failed",
                              log_system="folders.watch_failed#warn")
                continue
            self._watches[wd] = (sub, changed)
            wds.append(wd)
        self._by_path[path] = wds

    def ignore(self, path: str) -> None:
        for wd in self._by_path.pop(path, []):
            self._watches.pop(wd, None)
            self._remove(self._fd, wd)

    def stop(self) -> None:
        self._reactor.removeReader(self)
        os.close(self._fd)
        self._watches.clear()
        self._by_path.clear()

    # IReadDescriptor

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "inotify"

    def connectionLost(self, reason) -> None:
        pass

    def doRead(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        offset = 0
        watches = self._watches
        while offset + 16 <= len(data):
            wd, mask, _, size = _EVENT.unpack_from(data, offset)
            name = data[offset + 16 : offset + 16 + size].rstrip(b"\0")
            offset += 16 + size
            if mask & IN_Q_OVERFLOW:  # events were lost: every folder looks again
                for _, changed in list(watches.values()):
                    changed(None, None, 0)
                continue
            found = watches.get(wd)
            if found is not None and not mask & IN_IGNORED:
                found[1](found[0], name, mask)


class PollingWatcher:
    def __init__(self, clock, interval: float = POLL_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._loops: dict[str, LoopingCall] = {}

    def watch(self, path: str, changed: Changed) -> None:
        loop = LoopingCall(changed, None, None, 0)
        loop.clock = self._clock
        self._loops[path] = loop
        loop.start(self._interval, now=False)

    def ignore(self, path: str) -> None:
        loop = self._loops.pop(path, None)
        if loop is not None and loop.running:
            loop.stop()

    def stop(self) -> None:
        for path in list(self._loops):
            self.ignore(path)


class NoWatcher:
    """
    For tests that tell folders of changes themselves.
    """

    def __init__(self) -> None:
        self.watched: dict[str, Changed] = {}

    def watch(self, path: str, changed: Changed) -> None:
        self.watched[path] = changed

    def ignore(self, path: str) -> None:
        self.watched.pop(path, None)

    def stop(self) -> None:
        self.watched.clear()


def watcher_for(reactor):
    """
    Inotify where the system has it, else polling.
    """
    try:
        return InotifyWatcher(reactor)
    except (OSError, AttributeError):  # not Linux: no inotify_init1 in libc
        return PollingWatcher(reactor)
