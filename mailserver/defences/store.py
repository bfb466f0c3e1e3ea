"""
The defences' shared state: greylisting triplets and rate counters, in one
SQLite database in the data folder (C{defences.sqlite}).

Why SQLite: the state must outlive a restart and be shared by every worker
process, each of which may answer a retry.  SQLite gives both with
transactions across processes on one machine and nothing to run beside the
server; with write-ahead logging readers never wait for the writer and a
write is one append (C{synchronous = NORMAL}: a commit survives a crash of
the process, and at worst the last moments before a power loss are lost,
which costs a greylisted sender one more retry).  An append-only file of
our own would need its own locking across processes and compaction.

The database is opened at its first use and only ever touched in one
thread of this store's own, so the reactor never waits for the disk or
for another process's lock; each operation is one C{BEGIN IMMEDIATE}
transaction, so two processes that count at once both count.  Rows that have expired are deleted every
L{PRUNE_INTERVAL} seconds and after every L{PRUNE_EVERY} new triplets,
and past C{max_entries} the triplets least recently seen go first, so the
file stays bounded whatever a flood of new senders does.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailserver.safe_fs import SymlinkRefused, open_folder, open_path

PRUNE_INTERVAL = 600.0
PRUNE_EVERY = 1000
BUSY_TIMEOUT_MS = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX IF NOT EXISTS greylist_by_last_seen ON greylist (last_seen);
CREATE TABLE IF NOT EXISTS greylist_networks (
    network TEXT PRIMARY KEY,
    passes INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    count INTEGER NOT NULL,
    resets_at REAL NOT NULL,
    PRIMARY KEY (name, key)
);
"""


@dataclass(frozen=True)
class GreylistPolicy:
    """
    The C{checks.greylist_*} keys, in seconds.
    """

    delay: float
    retry_window: float
    expiry: float
    auto_whitelist: int
    max_entries: int


def greylist_wait(db: sqlite3.Connection, now: float, policy: GreylistPolicy,
                  network: str, sender: str, recipient: str) -> tuple[float, bool]:
    """
    How long this triplet must still wait (0: let it through), and whether
    it is new.  A retry after the delay passes the triplet and counts a
    pass for the network; a network with C{auto_whitelist} passes gets
    through at once from then on.
    """
    row = db.execute(
        "SELECT passes FROM greylist_networks WHERE network = ? AND last_seen > ?",
        (network, now - policy.expiry),
    ).fetchone()
    if row is not None and policy.auto_whitelist and row[0] >= policy.auto_whitelist:
        db.execute("UPDATE greylist_networks SET last_seen = ? WHERE network = ?", (now, network))
        return 0.0, False
    key = (network, sender, recipient)
    row = db.execute(
        "SELECT first_seen, last_seen, passed FROM greylist"
        " WHERE network = ? AND sender = ? AND recipient = ?", key,
    ).fetchone()
    if row is not None:
        first_seen, last_seen, passed = row
        if passed and now - last_seen <= policy.expiry:
            db.execute("UPDATE greylist SET last_seen = ? WHERE network = ? AND sender = ?"
                       " AND recipient = ?", (now, *key))
            return 0.0, False
        if not passed and now - first_seen <= policy.retry_window:
            waited = now - first_seen
            if waited < policy.delay:
                db.execute("UPDATE greylist SET last_seen = ? WHERE network = ? AND sender = ?"
                           " AND recipient = ?", (now, *key))
                return policy.delay - waited, False
            db.execute("UPDATE greylist SET last_seen = ?, passed = 1 WHERE network = ?"
                       " AND sender = ? AND recipient = ?", (now, *key))
            db.execute(
                "INSERT INTO greylist_networks (network, passes, last_seen) VALUES (?, 1, ?)"
                " ON CONFLICT (network) DO UPDATE SET passes = passes + 1, last_seen = ?",
                (network, now, now),
            )
            return 0.0, False
    db.execute(
        "INSERT OR REPLACE INTO greylist (network, sender, recipient, first_seen, last_seen, passed)"
        " VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now),
    )
    return policy.delay, True


def take(db: sqlite3.Connection, now: float, name: str, key: str, limit: int,
         period: float) -> tuple[bool, float]:
    """
    Count one more C{name} for C{key} in its window of C{period} seconds
    (which starts at the first one), unless C{limit} are counted already.

    @return: whether it was counted, and when the window ends.
    """
    row = db.execute("SELECT count, resets_at FROM counters WHERE name = ? AND key = ?",
                     (name, key)).fetchone()
    count, resets_at = row if row is not None and row[1] > now else (0, now + period)
    if count >= limit:
        return False, resets_at
    db.execute(
        "INSERT OR REPLACE INTO counters (name, key, count, resets_at) VALUES (?, ?, ?, ?)",
        (name, key, count + 1, resets_at),
    )
    return True, resets_at


def prune(db: sqlite3.Connection, now: float, policy: GreylistPolicy | None) -> None:
    """
    Delete what has expired; keep at most C{policy.max_entries} triplets.
    """
    db.execute("DELETE FROM counters WHERE resets_at <= ?", (now,))
    if policy is None:
        return
    db.execute("DELETE FROM greylist WHERE (passed = 0 AND first_seen < ?) OR last_seen < ?",
               (now - policy.retry_window, now - policy.expiry))
    db.execute("DELETE FROM greylist_networks WHERE last_seen < ?", (now - policy.expiry,))
    (count,) = db.execute("SELECT COUNT(*) FROM greylist").fetchone()
    if count > policy.max_entries:
        db.execute(
            "DELETE FROM greylist WHERE rowid IN"
            " (SELECT rowid FROM greylist ORDER BY last_seen LIMIT ?)",
            (count - policy.max_entries,),
        )


def connect(path: Path) -> sqlite3.Connection:
    """
    Open the database under the data folder's rules (L{mailserver.safe_fs}):
    the folder made 0700 if missing, the file made 0600 (SQLite gives its
    C{-wal} and C{-shm} files the database's mode), and none of the three
    a symbolic link.  SQLite cannot be told not to follow one, so the file
    is opened first without following, and the file SQLite opened must be
    that one.

    @raise SymlinkRefused: when one of the files is a link.
    """
    os.close(open_folder(path.parent, path.parent, create=True))
    for name in (f"{path}-wal", f"{path}-shm"):
        if os.path.islink(name):
            raise SymlinkRefused(name)
    fd = open_path(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        opened = os.fstat(fd)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
    finally:
        os.close(fd)
    now = os.stat(path, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):  # replaced meanwhile
        db.close()
        raise SymlinkRefused(path)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(SCHEMA)
    return db


class DefenceStore(Service):
    """
    The database, worked in a thread of its own while the service runs.

    @param greylist: the greylisting policy, when greylisting is on (for
        pruning).
    @param run: how an operation reaches the database: by default in the
        store's thread; tests pass one that runs it at once.
    """

    log = Logger()

    def __init__(self, path: Path, reactor, greylist: GreylistPolicy | None = None,
                 run: Callable[..., Any] | None = None) -> None:
        self._path = path
        self._reactor = reactor
        self.greylist_policy = greylist
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPool | None = None
        self._run = run or self._in_thread
        self._new_triplets = 0
        self._pruning = LoopingCall(self._prune)
        self._pruning.clock = reactor

    def startService(self) -> None:
        super().startService()
        if self._run == self._in_thread:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="defences-store")
            self._pool.start()
            # Sessions finishing their transactions at shutdown still ask
            # (the services stop together, not one after the other): the
            # thread and the database last until the reactor is done.
            self._reactor.addSystemEventTrigger("after", "shutdown", self._close)
        self._pruning.start(PRUNE_INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._pruning.running:
            self._pruning.stop()
        if self._pool is None:
            self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.stop()  # waits for the operation under way
            self._pool = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def _in_thread(self, operation, *args):
        if self._pool is None:
            raise RuntimeError("the defences store is not running")
        return deferToThreadPool(self._reactor, self._pool, operation, *args)

    def _transaction(self, operation, *args):
        if self._db is None:
            self._db = connect(self._path)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = operation(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _do(self, operation, *args):
        return self._run(self._transaction, operation, *args)

    async def greylist_wait(self, network: str, sender: str, recipient: str) -> float:
        policy = self.greylist_policy
        assert policy is not None
        wait, new = await self._do(
            greylist_wait, self._reactor.seconds(), policy, network, sender, recipient)
        if new:
            self._new_triplets += 1
            if self._new_triplets >= PRUNE_EVERY:
                self._new_triplets = 0
                self._prune()
        return wait

    async def take(self, name: str, key: str, limit: int, period: float) -> tuple[bool, float]:
        return await self._do(take, self._reactor.seconds(), name, key, limit, period)

    def _prune(self):
        """
        A failure is logged, and the next prune tries again.  A process
        that has not used the database leaves it to those that have: the
        file is opened only when a defence needs it, so a server whose
        defences see no traffic holds nothing open in the data folder.
        """
        if self._db is None:
            return None
        pruning = self._do(prune, self._reactor.seconds(), self.greylist_policy)
        return pruning.addErrback(
            lambda failure: self.log.failure("pruning {path} failed", failure, path=self._path,
                                             event="defences.prune_failed",
                                             log_system="defences.prune_failed#critical"))
