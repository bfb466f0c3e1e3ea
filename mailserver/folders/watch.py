"""
Noticing that a folder changed on disk, so a session in IDLE hears of a
delivery (or of another process's expunge or flag change) within a
second: inotify on the folder's C{new/} and C{cur/} where the system has
it, else a look every half second (a folder's scan returns at once when
the directories' times say nothing changed).

Inotify sees every writer, whatever process it is: the intake of this
process or of a worker, POP3, another IMAP process, a local mail client.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

POLL_INTERVAL = 0.5
_SUBDIRS = ("new", "cur")


class InotifyWatcher:
    log = Logger()

    def __init__(self, reactor) -> None:
        from twisted.internet import inotify

        self._inotify = inotify
        self._notifier = inotify.INotify(reactor)
        self._notifier.startReading()
        self._mask = (
            inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE | inotify.IN_Q_OVERFLOW
        )

    def watch(self, path: str, changed: Callable[[], None]) -> None:
        for sub in _SUBDIRS:
            try:
                self._notifier.watch(
                    FilePath(f"{path}/{sub}"),
                    mask=self._mask,
                    callbacks=[lambda _watch, _path, _mask: changed()],
                )
            except Exception as e:  # gone, or out of inotify watches
                self.log.warn("cannot watch {path}: {e}", path=f"{path}/{sub}", e=e)

    def ignore(self, path: str) -> None:
        for sub in _SUBDIRS:
            try:
                self._notifier.ignore(FilePath(f"{path}/{sub}"))
            except KeyError:
                pass

    def stop(self) -> None:
        self._notifier.loseConnection()


class PollingWatcher:
    def __init__(self, clock, interval: float = POLL_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._loops: dict[str, LoopingCall] = {}

    def watch(self, path: str, changed: Callable[[], None]) -> None:
        loop = LoopingCall(changed)
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
        self.watched: dict[str, Callable[[], None]] = {}

    def watch(self, path: str, changed: Callable[[], None]) -> None:
        self.watched[path] = changed

    def ignore(self, path: str) -> None:
        self.watched.pop(path, None)

    def stop(self) -> None:
        self.watched.clear()


def watcher_for(reactor):
    """
    Inotify where the platform and reactor have it, else polling.
    """
    try:
        return InotifyWatcher(reactor)
    except Exception:  # no inotify here (not Linux, or no such reactor support)
        return PollingWatcher(reactor)
