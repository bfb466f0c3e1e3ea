"""
Group commit: many sessions' messages made durable by two file-system syncs.

Making one message durable the usual way costs an fsync of its file and one
of its directory, and messages arriving together wait on each other's journal
commits.  Here every message that is waiting is written into C{tmp/}, the
file system is synced once (C{syncfs}: all the files' data), they are all
moved into C{new/}, and it is synced once more (all the directory entries).  Only then does any of them get its 250, so the
guarantee is the same as one-by-one fsyncs: nothing acknowledged is lost on
a crash, and nothing half-written is ever visible in C{new/}.

C{syncfs} flushes everything dirty on the file system holding the data
folder, so it suits a data folder on its own file system best; it is Linux's
(elsewhere C{sync} stands in).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

_MAX_BATCH = 256


def _load_syncfs() -> Callable[[int], None]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return lambda fd: os.sync()

    def call(fd: int) -> None:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return call


@dataclass
class _Job:
    prepare: Callable[[], Any]
    publish: Callable[[Any], Any]
    abandon: Callable[[Any], Any] | None
    deferred: defer.Deferred
    state: Any = None
    result: Any = None
    failure: Failure | None = field(default=None)


def _answer(batch: list[_Job]) -> None:
    """
    On the reactor thread: fire each job's Deferred.
    """
    for job in batch:
        if job.failure is None:
            job.deferred.callback(job.result)
        else:
            job.deferred.errback(job.failure)


class GroupCommitter:
    """
    Runs C{prepare} (write files into C{tmp/}) and C{publish} (move them into
    place) for many messages at once, with one sync after each phase.

    Two threads form a pipeline: the writer prepares the messages waiting,
    batch after batch, while the syncer makes the batches already prepared
    durable; so creating the next messages' files (the costly part on most
    file systems) overlaps the previous ones' syncs instead of waiting for
    them.  The syncer takes every prepared batch at once, so each cycle of
    two syncs serves as many messages as possible.
    """

    def __init__(self, reactor, data_path: Path) -> None:
        self._reactor = reactor
        self._data_path = data_path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._prepared: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._syncfs = _load_syncfs()
        self.batches = 0

    def submit(
        self,
        prepare: Callable[[], Any],
        publish: Callable[[Any], Any],
        abandon: Callable[[Any], Any] | None = None,
    ) -> defer.Deferred:
        """
        @param abandon: called with C{prepare}'s result when the sync after
            it fails, so C{publish} never runs: removes what C{prepare} wrote.
        @return: a Deferred firing with C{publish}'s result once everything
            both did is on stable storage, or failing with what either raised.
        """
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._write, name="mailserver-commit-write", daemon=True),
                threading.Thread(target=self._sync_loop, name="mailserver-commit-sync", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
            self._reactor.addSystemEventTrigger("after", "shutdown", self.stop)
        d: defer.Deferred = defer.Deferred()
        self._jobs.put(_Job(prepare, publish, abandon, d))
        return d

    def stop(self) -> None:
        """
        Finish what was submitted, then end both threads.
        """
        if self._threads:
            self._jobs.put(None)
            for thread in self._threads:
                thread.join(timeout=30)
            self._threads = []

    def _write(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                self._prepared.put(None)
                return
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # prepare this batch, then stop
                    break
                batch.append(job)
            for job in batch:
                try:
                    job.state = job.prepare()
                except BaseException:
                    job.failure = Failure()
            self._prepared.put(batch)

    def _sync_loop(self) -> None:
        fd = os.open(self._data_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            stopping = False
            while not stopping:
                first = self._prepared.get()
                if first is None:
                    return
                jobs = list(first)
                while True:
                    try:
                        more = self._prepared.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    jobs.extend(more)
                self._commit(jobs, fd)
        finally:
            os.close(fd)

    def _commit(self, batch: list[_Job], fd: int) -> None:
        """
        Make prepared jobs durable: sync their data, publish them, sync the
        names; then answer each.
        """
        self.batches += 1
        prepared = [job for job in batch if job.failure is None]
        self._sync(batch, fd)
        for job in prepared:
            if job.failure is not None:
                if job.abandon is not None:
                    try:
                        job.abandon(job.state)
                    except BaseException:
                        pass  # the sync's failure is what the client hears
                continue
            try:
                job.result = job.publish(job.state)
            except BaseException:
                job.failure = Failure()
        self._sync(batch, fd)
        # One wake-up of the reactor for the whole batch, not one per job.
        self._reactor.callFromThread(_answer, batch)

    def _sync(self, batch: list[_Job], fd: int) -> None:
        try:
            self._syncfs(fd)
        except OSError:
            failure = Failure()
            for job in batch:
                if job.failure is None:
                    job.failure = failure
