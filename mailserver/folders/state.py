"""
One folder's messages as a process knows them, and the scan that brings
that knowledge up to date with the disk.

A L{FolderState} is owned by the reactor thread: sessions read it there,
and it changes only when a L{Delta} is applied there.  The file work that
produces a delta (L{refresh} here, the changes in L{mailserver.folders.ops})
runs in a worker thread, one job per folder at a time, on the folder
opened for it (L{FolderFiles}: no link is followed), reading the state
but never changing it; only the folder's L{uidlist.UidList}, which nothing
on the reactor thread reads, is kept up to date by the jobs themselves.

Scanning is cheap when nothing changed: a folder whose C{new/} and C{cur/}
modification times and uidlist are as last seen is not listed at all (a
time within two seconds of the scan is not trusted: another change in the
same clock tick would leave it alone).  A listing reuses every entry whose
file name is unchanged, so a 100,000-message folder is parsed once per
process.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass, field

from mailserver.folders import uidlist
from mailserver.folders.disk import FolderFiles
from mailserver.folders.uidlist import UidList
from mailserver.interfaces import FolderGone

NEW = "new"
CUR = "cur"
# A directory changed this recently (nanoseconds) may change again within
# the same timestamp: list it next time whatever its time says.
_RACY_NS = 2_000_000_000
# Rewrite the uidlist when this share of its records name gone messages.
_STALE_SHARE = 0.25


class Entry:
    """
    One message: its UID, its file and what the file name says.

    @ivar base: the file name up to C{:}, the key of the uidlist.
    @ivar subdir: C{"new"} or C{"cur"}.
    @ivar flags: the Maildir info letters after C{:2,}, sorted.
    @ivar size: octets in CRLF form (from C{,W=}), -1 until known.
    @ivar internaldate: the file's modification time, 0 until known.
    """

    __slots__ = ("uid", "base", "subdir", "name", "flags", "size", "internaldate")

    def __init__(
        self, uid: int, base: str, subdir: str, name: str, flags: str, size: int,
        internaldate: float = 0.0,
    ) -> None:
        self.uid = uid
        self.base = base
        self.subdir = subdir
        self.name = name
        self.flags = flags
        self.size = size
        self.internaldate = internaldate

    def renamed(self, subdir: str, name: str, flags: str) -> Entry:
        return Entry(self.uid, self.base, subdir, name, flags, self.size, self.internaldate)

    def __repr__(self) -> str:
        return f"Entry({self.uid}, {self.subdir}/{self.name})"


def parse_name(name: str) -> tuple[str, str, int]:
    """
    A file name's base, flags and CRLF size (-1 when it does not say).
    """
    colon = name.find(":")
    if colon < 0:
        base, flags = name, ""
    else:
        base = name[:colon]
        flags = name[colon + 3 :] if name.startswith("2,", colon + 1) else ""
        if len(flags) > 1:
            flags = "".join(sorted(flags))
    size = -1
    w = base.find(",W=")
    if w >= 0:
        end = base.find(",", w + 3)
        digits = base[w + 3 :] if end < 0 else base[w + 3 : end]
        if digits.isdigit():
            size = int(digits)
    return base, flags, size


@dataclass
class Delta:
    """
    What a job found or did, to be applied to the state on the reactor
    thread.

    @ivar changed: entries that replace those of the same UID (renamed:
        new flags, or moved to C{cur/}).
    @ivar resolved: entries whose size or date a job learnt (nothing to
        tell the sessions).
    """

    added: list[Entry] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    changed: list[Entry] = field(default_factory=list)
    resolved: list[Entry] = field(default_factory=list)
    uidvalidity: int | None = None
    uidnext: int | None = None
    keywords: list[str] | None = None
    scanned: tuple | None = None

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.uidvalidity is not None)


class FolderState:
    """
    @ivar uids: the messages' UIDs, ascending (replaced, never changed in
        place, so a session may hold on to one).
    @ivar uidlist: the folder's uidlist as last read or written; only jobs
        use it.
    """

    def __init__(self, base: str, path: str, root: str) -> None:
        """
        @param base: the data folder, below which no link is followed.
        @param path: the folder.
        @param root: the account's Maildir (INBOX), whose folder it is.
        """
        self.base = base
        self.path = path
        self.root = root
        self.uidvalidity = 0
        self.uidnext = 1
        self.uids = array("I")
        self.entries: dict[int, Entry] = {}
        self.by_name: dict[str, int] = {}
        self.by_base: dict[str, int] = {}
        self.in_new_uids: set[int] = set()  # in new/: no session took them as recent
        self.keywords: list[str] = []
        self.uidlist: UidList | None = None
        self.scanned: tuple | None = None  # (new mtime, cur mtime, uidlist stamp, racy)
        self.loaded = False

    def files(self) -> FolderFiles:
        """
        The folder, opened for a job.

        @raise FolderGone: it is not there any more.
        """
        try:
            return FolderFiles(self.base, self.path)
        except FileNotFoundError:
            raise FolderGone(self.path) from None

    def entry(self, uid: int) -> Entry | None:
        return self.entries.get(uid)

    def in_new(self) -> list[int]:
        return sorted(self.in_new_uids)

    def apply(self, delta: Delta) -> None:
        """
        Take in a job's findings (on the reactor thread).
        """
        entries = self.entries
        if delta.uidvalidity is not None and delta.uidvalidity != self.uidvalidity:
            if self.loaded:  # the list was lost: every UID changed
                entries.clear()
                self.by_name.clear()
                self.by_base.clear()
                self.in_new_uids.clear()
                self.uids = array("I")
            self.uidvalidity = delta.uidvalidity
        if delta.uidnext is not None:
            self.uidnext = max(self.uidnext, delta.uidnext)
        if delta.keywords is not None:
            self.keywords = delta.keywords
        in_new = self.in_new_uids
        for uid in delta.removed:
            old = entries.pop(uid, None)
            if old is not None:
                self.by_name.pop(old.name, None)
                self.by_base.pop(old.base, None)
                in_new.discard(uid)
        for entry in delta.changed + delta.resolved:
            old = entries.get(entry.uid)
            if old is None:
                continue
            if old.name != entry.name:
                self.by_name.pop(old.name, None)
                self.by_name[entry.name] = entry.uid
            if old.subdir != entry.subdir:
                if entry.subdir == NEW:
                    in_new.add(entry.uid)
                else:
                    in_new.discard(entry.uid)
            entries[entry.uid] = entry
        for entry in delta.added:
            if entry.uid in entries:
                continue
            entries[entry.uid] = entry
            self.by_name[entry.name] = entry.uid
            self.by_base[entry.base] = entry.uid
            if entry.subdir == NEW:
                in_new.add(entry.uid)
            self.uidnext = max(self.uidnext, entry.uid + 1)
        if delta.removed or delta.added:
            removed = set(delta.removed)
            kept = [uid for uid in self.uids if uid not in removed] if removed else list(self.uids)
            added = sorted(entry.uid for entry in delta.added)
            if added and kept and added[0] < kept[-1]:
                kept = sorted(set(kept) | set(added))
            else:
                kept.extend(added)
            self.uids = array("I", kept)
        if delta.scanned is not None:
            self.scanned = delta.scanned
        self.loaded = True


# The scan, in a worker thread.


def _stamps(files: FolderFiles) -> tuple:
    new = os.fstat(files.sub(NEW)).st_mtime_ns
    cur = os.fstat(files.sub(CUR)).st_mtime_ns
    list_stamp = uidlist.file_stamp(files)
    racy = time.time_ns() - max(new, cur) < _RACY_NS
    return (new, cur, list_stamp, racy)


def listing(files: FolderFiles) -> dict[str, str]:
    """
    File name to sub-folder, C{new/} listed before C{cur/}: a message moved
    from one to the other meanwhile is seen in C{cur/} rather than missed.
    """
    found = dict.fromkeys((n for n in files.listdir(NEW) if n[:1] != "."), NEW)
    found.update(dict.fromkeys((n for n in files.listdir(CUR) if n[:1] != "."), CUR))
    return found


def refresh(state: FolderState, force: bool = False) -> Delta:
    """
    Bring what the state knows up to date with the disk: new files get
    UIDs (from the uidlist, or new ones written to it), renamed ones their
    new flags, and vanished ones are gone.

    @raise FileNotFoundError: the folder is gone.
    @raise mailserver.safe_fs.SymlinkRefused: it, or one of its
        sub-folders, is a symbolic link.
    """
    with state.files() as files:
        return _refresh(state, files, force)


def _refresh(state: FolderState, files: FolderFiles, force: bool) -> Delta:
    stamps = _stamps(files)
    delta = Delta(scanned=stamps)
    if not state.loaded:
        force = True
    elif not force and state.scanned is not None and stamps[:3] == state.scanned[:3]:
        if not state.scanned[3]:
            return delta
    _read_uidlist(state, files, delta, stamps[2])
    by_name, by_base = state.by_name, state.by_base
    if state.loaded and delta.uidvalidity not in (None, state.uidvalidity):
        # The list was lost or replaced: every message is new again.
        delta.removed = list(state.uids)
        by_name, by_base = {}, {}
    found = listing(files)
    # Set operations on the names, in C: a folder of 100,000 messages
    # where little changed costs two listings and two set differences.
    gone_names = by_name.keys() - found.keys()
    if gone_names:
        # A name renamed while listed may be missed by readdir: a second
        # look before a message is called gone.
        found.update(listing(files))
        gone_names = by_name.keys() - found.keys()
    gone_set = {by_name[name] for name in gone_names}
    fresh: dict[str, tuple[str, str, int, str]] = {}
    for name in found.keys() - by_name.keys():
        subdir = found[name]
        base, flags, size = parse_name(name)
        uid = by_base.get(base)
        if uid is not None:
            if uid in gone_set:  # renamed: new flags, or moved to cur/
                gone_set.discard(uid)
                old = state.entries[uid]
                delta.changed.append(old.renamed(subdir, name, flags))
            continue  # else a second copy under the same base: ignored
        if base in fresh and fresh[base][0] == CUR:
            continue
        fresh[base] = (subdir, name, size, flags)
    delta.removed = sorted(gone_set.union(delta.removed))
    if fresh:
        _assign(state, files, delta, fresh)
    ul = state.uidlist
    if ul is not None:
        delta.uidnext = ul.next_uid
        live = len(state.uids) - len(delta.removed) + len(delta.added)
        if ul.records > 16 and (ul.records - live) > ul.records * _STALE_SHARE:
            _compress(state, files, delta)
    return delta


def _read_uidlist(state: FolderState, files: FolderFiles, delta: Delta, stamp) -> None:
    ul = state.uidlist
    if ul is not None and stamp == ul.stamp:
        return
    fresh = uidlist.read(files)
    if fresh is None:
        if ul is None:
            _create_uidlist(state, files, delta)
        return
    state.uidlist = fresh
    delta.uidvalidity = fresh.uidvalidity
    delta.keywords = uidlist.read_keywords(files)


def _create_uidlist(state: FolderState, files: FolderFiles, delta: Delta) -> None:
    with uidlist.Lock(files):
        existing = uidlist.read(files)
        if existing is None:
            existing = UidList(
                uidvalidity=uidlist.next_uidvalidity(state.base, state.root), next_uid=1
            )
            uidlist.rewrite(files, existing)
    state.uidlist = existing
    delta.uidvalidity = existing.uidvalidity
    delta.keywords = uidlist.read_keywords(files)


def _assign(state: FolderState, files: FolderFiles, delta: Delta, fresh: dict[str, tuple]) -> None:
    """
    UIDs for files the state did not know: from the uidlist if another
    process (or an earlier run) gave them one, else new ones, in name
    order (delivery order), written under the lock.
    """
    ul = state.uidlist
    assert ul is not None
    unknown = [base for base in fresh if base not in ul.uids]
    if unknown:
        with uidlist.Lock(files):
            current = uidlist.read(files)
            if current is not None and current.stamp != ul.stamp:
                if current.uidvalidity != ul.uidvalidity:
                    delta.uidvalidity = current.uidvalidity
                state.uidlist = ul = current
            added = []
            for base in sorted(unknown):
                if base not in ul.uids:
                    added.append((base, ul.next_uid))
                    ul.next_uid += 1
            if added:
                if current is None:
                    ul.uids.update(added)
                    uidlist.rewrite(files, ul)
                else:
                    uidlist.append(files, ul, added)
    for base, (subdir, name, size, flags) in fresh.items():
        delta.added.append(Entry(ul.uids[base], base, subdir, name, flags, size))
    delta.added.sort(key=lambda entry: entry.uid)


def _compress(state: FolderState, files: FolderFiles, delta: Delta) -> None:
    """
    Write the uidlist anew without the records of gone messages.
    """
    with uidlist.Lock(files):
        current = uidlist.read(files)
        if current is None or current.stamp != state.uidlist.stamp:
            return  # changed meanwhile: the next scan reads it first
        live = set(state.by_base) | {entry.base for entry in delta.added}
        live -= {state.entries[uid].base for uid in delta.removed if uid in state.entries}
        current.uids = {base: uid for base, uid in current.uids.items() if base in live}
        uidlist.rewrite(files, current)
        state.uidlist = current
