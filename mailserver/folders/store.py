"""
Folders shared by every session of a process: one L{SharedFolder} per
folder, whose state the sessions read on the reactor thread and whose file
work runs in a worker thread, one job at a time (a C{DeferredLock}), each
job's findings applied on the reactor thread before the next starts.  Every
session watching the folder is told of every change.

Changes made elsewhere (a delivery, another process, a mail client working
on the Maildir directly) are noticed through the folder's C{new/} and
C{cur/} being watched (inotify, see L{mailserver.folders.watch}) while a
session has the folder selected, and at every refresh a session asks for.
A folder no session uses is kept for a while (L{IDLE_FOLDERS}), so
selecting a large folder again does not read it again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.folders import flags as F
from mailserver.folders import names as N
from mailserver.folders import ops, tree
from mailserver.folders.state import Delta, FolderState, refresh
from mailserver.folders.watch import APPEARED, GONE
from mailserver.interfaces import FolderError, FolderGone, IFolderStore, IMailAccount, IMailFolder
from mailserver.maildir import UniqueNames
from mailserver.safe_fs import SymlinkRefused

# Folders kept loaded while no session uses them.
IDLE_FOLDERS = 64
# Changes noticed on disk within this many seconds are taken in together.
SETTLE = 0.02
# Flag changes of at most this many messages are made on the reactor thread.
INLINE_FLAG_CHANGES = 16


@dataclass(frozen=True)
class Change:
    """
    What one change did to a folder.

    @ivar changed: UIDs whose flags changed.
    @ivar origin: whoever asked for the change (C{None}: someone else).
    """

    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    changed: tuple[int, ...] = ()
    origin: object = None


@implementer(IMailFolder)
class SharedFolder:
    log = Logger()

    def __init__(self, store: MailStore, root: str, name: str) -> None:
        self._store = store
        self.name = name
        self.root = root
        self.path = tree.folder_path(root, name)
        self._state = FolderState(store.base, self.path, root)
        self._serial = defer.DeferredLock()
        self._listeners: list[Callable[[Change], None]] = []
        self._users = 0
        self._refresh_waiters: list[defer.Deferred] | None = None
        self._settle_call = None
        self._events: list[tuple] = []
        self._names_for: list[str] | None = None
        self._names: dict[str, list[str]] = {}
        self.forgotten = False

    # What sessions read.

    @property
    def uidvalidity(self) -> int:
        return self._state.uidvalidity

    @property
    def uidnext(self) -> int:
        return self._state.uidnext

    @property
    def uids(self) -> Sequence[int]:
        return self._state.uids

    @property
    def keywords(self) -> list[str]:
        return [k for k in self._state.keywords if k]

    @property
    def can_add_keywords(self) -> bool:
        return len(self._state.keywords) < 26

    def flags(self, uid: int) -> list[str]:
        entry = self._state.entries.get(uid)
        if entry is None:
            return []
        # The same letters give the same flags: a FETCH FLAGS of a large
        # folder names each set once.  Callers do not change the list.
        keywords = self._state.keywords
        if keywords is not self._names_for:
            self._names_for = keywords
            self._names = {}
        names = self._names.get(entry.flags)
        if names is None:
            names = self._names[entry.flags] = F.names(entry.flags, keywords)
        return names

    def unseen(self) -> list[int]:
        entries = self._state.entries
        return [uid for uid in self._state.uids if F.SEEN not in entries[uid].flags]

    def letters(self, uid: int) -> str:
        entry = self._state.entries.get(uid)
        return entry.flags if entry is not None else ""

    def size(self, uid: int) -> int:
        entry = self._state.entries.get(uid)
        return entry.size if entry is not None else -1

    def internaldate(self, uid: int) -> float:
        entry = self._state.entries.get(uid)
        return entry.internaldate if entry is not None else 0.0

    def in_new(self) -> list[int]:
        return self._state.in_new()

    def key(self, uid: int) -> str | None:
        entry = self._state.entries.get(uid)
        return entry.base if entry is not None else None

    # Jobs.

    def _run(self, job, *args, origin=None, inline: bool = False) -> defer.Deferred:
        """
        Run C{job(state, *args)} in a worker thread after the jobs before
        it; apply its delta here and tell the watchers.  The result is the
        job's second value, if it returns a pair.

        @param inline: run it on the reactor thread instead: a few renames
            cost less than handing the job to a thread and back.
        """

        def start():
            if inline:
                d = defer.maybeDeferred(job, self._state, *args)
            else:
                d = self._store.run_blocking(job, self._state, *args)
            return d.addCallback(self._applied, origin)

        return self._serial.run(start)

    def _applied(self, outcome, origin):
        delta, result = outcome if isinstance(outcome, tuple) else (outcome, None)
        state = self._state
        before = {entry.uid: state.entries[entry.uid].flags for entry in delta.changed
                  if entry.uid in state.entries}
        removed = tuple(uid for uid in delta.removed if uid in state.entries)
        state.apply(delta)
        change = Change(
            added=tuple(entry.uid for entry in delta.added),
            removed=removed,
            changed=tuple(
                entry.uid for entry in delta.changed
                if entry.uid in before and before[entry.uid] != entry.flags
            ),
            origin=origin,
        )
        if change.added or change.removed or change.changed or delta.keywords is not None:
            for listener in list(self._listeners):
                listener(change)
        return result

    def refresh(self) -> defer.Deferred:
        """
        Catch up with the disk.  Requests made while one waits to run are
        answered by that one.
        """
        waiter: defer.Deferred = defer.Deferred()
        if self._refresh_waiters is not None:
            self._refresh_waiters.append(waiter)
            return waiter
        self._refresh_waiters = waiters = [waiter]

        def start(_=None):
            self._refresh_waiters = None  # later requests queue a new one
            return self._store.run_blocking(refresh, self._state)

        def done(result):
            for each in waiters:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(None)

        running = self._serial.run(lambda: start().addCallback(self._applied, None))
        running.addBoth(done)
        return waiter

    def claim_recent(self) -> defer.Deferred:
        return self._run(ops.claim_recent)

    def store(self, uids, mode: str, flags, origin) -> defer.Deferred:
        before = {uid: self._state.entries[uid].flags for uid in uids if uid in self._state.entries}

        def changed(_):
            after = self._state.entries
            return [uid for uid in before if uid in after and after[uid].flags != before[uid]]

        # A few messages' system flags (a client reading its mail sets
        # \\Seen a message at a time) are renamed here; keywords may need the
        # folder's lock, so they go to a thread.
        inline = len(before) <= INLINE_FLAG_CHANGES and all(f.startswith("\\") for f in flags)
        storing = self._run(ops.store, list(uids), mode, list(flags), origin=origin, inline=inline)
        return storing.addCallback(changed)

    def expunge(self, uids, origin) -> defer.Deferred:
        present = [uid for uid in uids if uid in self._state.entries]
        return self._run(ops.expunge, present, origin=origin).addCallback(lambda _: present)

    def transfer(self, uids, target: str, move: bool, origin) -> defer.Deferred:
        try:
            target = N.check(target)  # "" or "a.b" name no folder (a.b is not a/b)
        except N.BadName as e:
            return defer.fail(FolderError("CANNOT", str(e)))
        path = tree.folder_path(self.root, target)
        d = self._store.run_blocking(tree.exists, self._store.base, self.root, target)

        def go(found):
            if not found:
                raise FolderError("TRYCREATE", "Mailbox doesn't exist")
            return self._run(ops.transfer, list(uids), path, self._store.names, move, origin=origin)

        def done(result):
            self._store.changed_elsewhere(path)
            return result

        return d.addCallback(go).addCallback(done)

    def append(self, source, flags, internaldate) -> defer.Deferred:
        return self._run(ops.append, self._store.names, source, list(flags), internaldate)

    def read(self, uids, whole_limit: int) -> defer.Deferred:
        return self._run(ops.read, list(uids), whole_limit)

    def describe(self, uids) -> defer.Deferred:
        wanted = [
            uid for uid in uids
            if (entry := self._state.entries.get(uid)) is not None
            and (entry.size < 0 or not entry.internaldate)
        ]
        if not wanted:
            return defer.succeed(None)
        return self._run(ops.describe, wanted)

    # Watching.

    def watch(self, listener: Callable[[Change], None]) -> None:
        if not self._listeners:
            self._store.watcher.watch(self.path, self._disk_changed)
        self._listeners.append(listener)

    def unwatch(self, listener: Callable[[Change], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
            if not self._listeners:
                self._store.watcher.ignore(self.path)

    def _disk_changed(self, subdir: str | None = None, name: bytes | None = None, mask: int = 0) -> None:
        """
        Something in C{new/} or C{cur/} changed (C{subdir} and C{name} say
        what, when the watcher knows): look shortly, at a delivery's or a
        rename's several events at once.
        """
        self._events.append((subdir, name, mask))
        if self._settle_call is None or not self._settle_call.active():
            self._settle_call = self._store.clock.callLater(SETTLE, self._settled)

    def _settled(self) -> None:
        self._settle_call = None
        if self.forgotten:
            return
        if self._serial.locked:
            # A job of ours is under way: its renames are among the events,
            # and are known once it is done.
            self._settle_call = self._store.clock.callLater(SETTLE, self._settled)
            return
        events, self._events = self._events, []
        if any(self._foreign(*event) for event in events):
            self.refresh().addErrback(self._refresh_failed)

    def _refresh_failed(self, failure: Failure) -> None:
        if failure.check(FolderGone):  # its sessions hear of it at their next command
            self.log.info("Folder {path} was deleted or renamed", path=self.path,
                          event="folders.deleted", log_system="folders.deleted#info")
            return
        self.log.failure("Refreshing {path} failed", failure, path=self.path,
                         event="folders.refresh_failed", log_system="folders.refresh_failed#critical")

    def _foreign(self, subdir: str | None, name: bytes | None, mask: int) -> bool:
        """
        Was this change made by someone else (a change this process made
        is in the state already)?
        """
        if subdir is None or name is None:
            return True
        text = os.fsdecode(name)
        if text[:1] == ".":
            return False  # not a message
        uid = self._state.by_name.get(text)
        known_here = uid is not None and self._state.entries[uid].subdir == subdir
        if mask & APPEARED:
            return not known_here
        if mask & GONE:
            return known_here
        return True

    # Users.

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            self._store.idle(self)

    @property
    def in_use(self) -> bool:
        return self._users > 0 or bool(self._listeners)


@implementer(IMailAccount)
class MailAccount:
    def __init__(self, store: MailStore, root: str) -> None:
        self._store = store
        self.root = root

    def _blocking(self, f, *args) -> defer.Deferred:
        return self._store.run_blocking(f, self._store.base, self.root, *args)

    def prepare(self) -> defer.Deferred:
        return self._blocking(tree.prepare)

    def names(self) -> defer.Deferred:
        return self._blocking(tree.list_names)

    def subscriptions(self) -> defer.Deferred:
        return self._blocking(tree.read_subscriptions)

    def special_use(self, name: str) -> str | None:
        return tree.special_use(name)

    def create(self, name: str) -> defer.Deferred:
        return self._blocking(tree.create, name)

    def delete(self, name: str) -> defer.Deferred:
        path = tree.folder_path(self.root, N.normalize(name)) if N.normalize(name) != N.INBOX else None
        d = self._blocking(tree.delete, name)
        if path is not None:
            d.addCallback(lambda _: self._store.forget(path))
        return d

    def rename(self, old: str, new: str) -> defer.Deferred:
        d = self._blocking(tree.rename, old, new)
        return d.addCallback(lambda _: self._store.forget_under(self.root))

    def subscribe(self, name: str, subscribed: bool) -> defer.Deferred:
        return self._blocking(tree.set_subscribed, name, subscribed)

    def open(self, name: str) -> defer.Deferred:
        return self._store.open(self.root, N.normalize(name))


@implementer(IFolderStore)
class MailStore:
    """
    @param path_for: an account's canonical address to its Maildir.
    @param base: the data folder, below which no link is followed.
    @param run_blocking: runs file work in a worker thread and returns a
        Deferred of its result.
    @param watcher: tells a folder of changes on disk
        (L{mailserver.folders.watch}).
    """

    def __init__(
        self,
        path_for: Callable[[str], Path],
        base: Path,
        run_blocking: Callable[..., defer.Deferred],
        clock,
        watcher,
        hostname: str,
    ) -> None:
        self._path_for = path_for
        self.base = str(base)
        self.run_blocking = run_blocking
        self.clock = clock
        self.watcher = watcher
        self.names = UniqueNames(hostname)
        self._folders: dict[str, SharedFolder] = {}
        self._idle: OrderedDict[str, SharedFolder] = OrderedDict()

    def account(self, address: str) -> MailAccount:
        return MailAccount(self, str(self._path_for(address)))

    def open(self, root: str, name: str) -> defer.Deferred:
        try:
            checked = N.check(name)
        except N.BadName as e:
            return defer.fail(FolderError("CANNOT", str(e)))
        path = tree.folder_path(root, checked)
        folder = self._folders.get(path)
        if folder is None:
            folder = self._folders[path] = SharedFolder(self, root, checked)
        self._idle.pop(path, None)
        folder.acquire()

        def opened(_):
            return folder

        def failed(failure):
            folder.release()
            linked = failure.check(SymlinkRefused) and failure.value.filename == path
            if failure.check(FileNotFoundError, FolderGone) or linked:
                # A link in a folder's place is not followed: no folder.
                self.forget(path)
                raise FolderError("NONEXISTENT", "Mailbox doesn't exist")
            return failure

        return folder.refresh().addCallbacks(opened, failed)

    def idle(self, folder: SharedFolder) -> None:
        """
        No session uses the folder: keep it a while for the next.
        """
        if folder.in_use or folder.forgotten:
            return
        self._idle[folder.path] = folder
        self._idle.move_to_end(folder.path)
        while len(self._idle) > IDLE_FOLDERS:
            path, _ = self._idle.popitem(last=False)
            self._folders.pop(path, None)

    def changed_elsewhere(self, path: str) -> None:
        """
        A job of another folder changed this one (COPY, MOVE).
        """
        folder = self._folders.get(path)
        if folder is not None and folder.in_use:
            folder._disk_changed()

    def forget(self, path: str) -> None:
        folder = self._folders.pop(path, None)
        self._idle.pop(path, None)
        if folder is not None:
            folder.forgotten = True

    def forget_under(self, root: str) -> None:
        for path in [p for p, f in self._folders.items() if f.root == root and p != root]:
            self.forget(path)


__all__ = ["Change", "Delta", "FolderError", "MailStore", "SharedFolder"]
