"""
The changes a session makes to a folder, as jobs for a worker thread:
flags (renames in C{cur/}), expunges (unlinks), taking \\Recent (moves
from C{new/} to C{cur/}), APPEND (a durable new file and its UID), COPY
(hard links) and MOVE (links, then unlinks) into another folder, and reading messages.

Each job reads the L{FolderState} and returns a L{Delta} for the reactor
thread to apply (see L{mailserver.folders.state}).  A file that another
process renamed meanwhile (new flags) is looked up again by its base name
and the change retried once; one that is gone stays gone.

Each job opens its folder (and a COPY's or MOVE's target) for itself
(L{FolderFiles}): files are made, renamed, linked and read relative to
the folders' descriptors, and a symbolic link in place of a folder or a
message file is refused, never followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from twisted.logger import Logger

from mailserver.folders import flags as F
from mailserver.folders import uidlist
from mailserver.folders.disk import MAKE, FolderFiles, write_all
from mailserver.folders.state import CUR, NEW, Delta, Entry, FolderState, listing, parse_name
from mailserver.maildir import UniqueNames
from mailserver.safe_fs import SymlinkRefused

log = Logger()
TMP = "tmp"

_CHUNK = 64 * 1024


def _locate(files: FolderFiles, entries: Iterable[Entry]) -> dict[int, Entry]:
    """
    Where messages whose files were renamed by someone else are now.
    """
    wanted = {entry.base: entry for entry in entries}
    found: dict[int, Entry] = {}
    for name, subdir in listing(files).items():
        base, letters, _ = parse_name(name)
        entry = wanted.get(base)
        if entry is not None:
            found[entry.uid] = entry.renamed(subdir, name, letters)
    return found


def _with_retry(files: FolderFiles, entries: list[Entry], action) -> list[Entry]:
    """
    Run C{action(entry)} on each entry; those whose file was missing are
    looked up once and tried again.  Returns the entries found nowhere.
    """
    missing = []
    for entry in entries:
        try:
            action(entry)
        except FileNotFoundError:
            missing.append(entry)
    if not missing:
        return []
    moved = _locate(files, missing)
    lost = []
    for entry in missing:
        current = moved.get(entry.uid)
        if current is None:
            lost.append(entry)
            continue
        try:
            action(current)
        except FileNotFoundError:
            lost.append(entry)
    return lost


def _grow_keywords(files: FolderFiles, wanted: Iterable[str]) -> list[str]:
    """
    Add keywords to a folder's table under its lock (another process may
    have added some meanwhile); returns the table.
    """
    with uidlist.Lock(files):
        table = uidlist.read_keywords(files)
        _, grown = F.letters(wanted, table, add_keywords=True)
        if grown is not None:
            uidlist.write_keywords(files, grown)
            table = grown
    return table


def store(state: FolderState, uids: Sequence[int], mode: str, flag_names: Sequence[str]) -> Delta:
    """
    Set (C{mode} C{""}), add (C{"+"}) or remove (C{"-"}) flags.
    """
    with state.files() as files:
        return _store(state, files, uids, mode, flag_names)


def _store(
    state: FolderState, files: FolderFiles, uids: Sequence[int], mode: str, flag_names: Sequence[str]
) -> Delta:
    delta = Delta()
    keywords = state.keywords
    letters, grown = F.letters(flag_names, keywords, add_keywords=mode != "-")
    if grown is not None:
        keywords = delta.keywords = _grow_keywords(files, flag_names)
        letters, _ = F.letters(flag_names, keywords, add_keywords=False)
    wanted = set(letters)

    def target(current: str) -> str:
        if mode == "+":
            new = set(current) | wanted
        elif mode == "-":
            new = set(current) - wanted
        else:  # keep the letters with no IMAP meaning
            new = {c for c in current if "A" <= c <= "Z" and c not in "DFRST"} | wanted
        return "".join(sorted(new))

    def rename(entry: Entry) -> None:
        # The entry's letters are the file's: on a retry, those another
        # process gave it meanwhile.
        new_letters = target(entry.flags)
        if new_letters == entry.flags:
            return
        name = f"{entry.base}:2,{new_letters}"
        files.rename(entry.subdir, entry.name, CUR, name)
        delta.changed.append(entry.renamed(CUR, name, new_letters))

    entries = [state.entries[uid] for uid in uids if uid in state.entries]
    changing = [entry for entry in entries if target(entry.flags) != entry.flags]
    _with_retry(files, changing, rename)
    return delta


def expunge(state: FolderState, uids: Sequence[int]) -> Delta:
    """
    Remove messages, durably (their folders are synced).
    """
    delta = Delta()
    entries = [state.entries[uid] for uid in uids if uid in state.entries]
    touched: set[str] = set()
    with state.files() as files:

        def unlink(entry: Entry) -> None:
            files.unlink(entry.name, entry.subdir)
            touched.add(entry.subdir)

        _with_retry(files, entries, unlink)
        for subdir in touched:
            files.sync(subdir)
    delta.removed = sorted(entry.uid for entry in entries)
    return delta


def claim_recent(state: FolderState) -> tuple[Delta, list[int]]:
    """
    Move the messages in C{new/} to C{cur/}: those this job moved are
    \\Recent to the session that asked (RFC 3501 2.3.2: only one session
    is told a message is recent); those someone else moved first are not.
    """
    delta = Delta()
    claimed = []
    waiting = state.in_new()
    if not waiting:
        return delta, claimed
    with state.files() as files:
        for uid in waiting:
            entry = state.entries[uid]
            name = entry.name if ":" in entry.name else entry.name + ":2,"
            try:
                files.rename(NEW, entry.name, CUR, name)
            except FileNotFoundError:
                continue  # another session took it; the next scan sees where
            delta.changed.append(entry.renamed(CUR, name, entry.flags))
            claimed.append(uid)
    return delta, claimed


def _write_lf(fd: int, source: bytes | BinaryIO) -> tuple[int, int]:
    """
    Write CRLF text as LF text (as every Maildir file is); return the
    octets written and the number of LFs.
    """
    size = lines = 0

    def put(data: bytes) -> None:
        nonlocal size, lines
        write_all(fd, data)
        size += len(data)
        lines += data.count(b"\n")

    if isinstance(source, (bytes, bytearray)):
        put(bytes(source).replace(b"\r\n", b"\n"))
        return size, lines
    source.seek(0)
    carry = b""
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            break
        chunk = carry + chunk
        carry = b"\r" if chunk.endswith(b"\r") else b""
        put((chunk[:-1] if carry else chunk).replace(b"\r\n", b"\n"))
    if carry:
        put(carry)
    return size, lines


def append(
    state: FolderState,
    names: UniqueNames,
    source: bytes | BinaryIO,
    flag_names: Sequence[str],
    internaldate: float | None,
) -> tuple[Delta, int]:
    """
    Store a message durably (file synced, renamed into C{new/}, or C{cur/}
    when it has flags, that folder synced) and give it a UID (recorded in
    the synced uidlist) before the caller answers OK.
    """
    with state.files() as files:
        return _append(state, files, names, source, flag_names, internaldate)


def _append(
    state: FolderState,
    files: FolderFiles,
    names: UniqueNames,
    source: bytes | BinaryIO,
    flag_names: Sequence[str],
    internaldate: float | None,
) -> tuple[Delta, int]:
    delta = Delta()
    letters, grown = F.letters(flag_names, state.keywords, add_keywords=True)
    if grown is not None:
        delta.keywords = _grow_keywords(files, flag_names)
        letters, _ = F.letters(flag_names, delta.keywords, add_keywords=False)
    unique = names.next()
    fd = files.open(unique, MAKE, sub=TMP)
    try:
        size, lines = _write_lf(fd, source)
        if internaldate is not None:
            os.utime(fd, (internaldate, internaldate))
        os.fsync(fd)
        when = internaldate if internaldate is not None else os.fstat(fd).st_mtime
    except BaseException:
        os.close(fd)
        files.unlink(unique, TMP)
        raise
    os.close(fd)
    base = f"{unique},S={size},W={size + lines}"
    subdir = CUR if letters else NEW
    name = f"{base}:2,{letters}" if letters else base
    try:
        files.rename(TMP, unique, subdir, name)
    except BaseException:
        try:
            files.unlink(unique, TMP)
        except OSError:
            pass
        raise
    files.sync(subdir)
    (uid,) = _assign_uids(files, state.root, [base], state)
    delta.added.append(Entry(uid, base, subdir, name, letters, size + lines, when))
    delta.uidnext = uid + 1
    return delta, uid


def _assign_uids(
    files: FolderFiles, root: str, bases: list[str], state: FolderState | None = None
) -> list[int]:
    """
    The UIDs of these files in the folder C{files}: the ones the uidlist
    has, new ones for the rest, recorded durably under the lock.  With the
    folder's C{state}, its uidlist is kept as read.

    @param root: the account's Maildir (a new folder's UIDVALIDITY is
        counted there).
    """
    with uidlist.Lock(files):
        current = uidlist.read(files)
        added = []
        if current is None:
            current = uidlist.UidList(
                uidvalidity=uidlist.next_uidvalidity(files.base, root), next_uid=1
            )
        for base in bases:
            if base not in current.uids:
                added.append((base, current.next_uid))
                current.next_uid += 1
        if current.stamp is None:
            current.uids.update(added)
            uidlist.rewrite(files, current)
        elif added:
            uidlist.append(files, current, added)
    if state is not None and state.uidlist is not None:
        if current.uidvalidity == state.uidlist.uidvalidity:
            state.uidlist = current
    return [current.uids[base] for base in bases]


def transfer(
    state: FolderState,
    uids: Sequence[int],
    target: str,
    names: UniqueNames,
    move: bool,
) -> tuple[Delta, tuple[int, list[tuple[int, int]]]]:
    """
    COPY (hard links) or MOVE (a link and an unlink) messages into the folder at
    C{target}, with their flags, durably; returns the source's delta
    (MOVE's removals), and the target's UIDVALIDITY with the (source UID,
    target UID) pairs (for COPYUID, RFC 4315).
    """
    with state.files() as files, FolderFiles(state.base, target) as into:
        return _transfer(state, files, into, uids, names, move)


def _transfer(
    state: FolderState,
    files: FolderFiles,
    into: FolderFiles,
    uids: Sequence[int],
    names: UniqueNames,
    move: bool,
) -> tuple[Delta, tuple[int, list[tuple[int, int]]]]:
    delta = Delta()
    entries = [state.entries[uid] for uid in uids if uid in state.entries]
    target_keywords = uidlist.read_keywords(into)
    placed: list[tuple[Entry, str]] = []

    def place(entry: Entry) -> None:
        nonlocal target_keywords
        letters, grown = F.translate(entry.flags, state.keywords, target_keywords)
        if grown is not None:
            target_keywords = _grow_keywords(into, F.names(entry.flags, state.keywords))
            letters, _ = F.translate(entry.flags, state.keywords, target_keywords)
        base = entry.base
        for _ in range(3):
            destination = f"{base}:2,{letters}"
            try:
                # A rename would silently replace a file of that name: a
                # link fails instead, and MOVE removes the source after.
                # A link in the message's place is linked as a link.
                os.link(
                    entry.name, destination, src_dir_fd=files.sub(entry.subdir),
                    dst_dir_fd=into.sub(CUR), follow_symlinks=False,
                )
                if move:
                    files.unlink(entry.name, entry.subdir)
                break
            except FileExistsError:  # a copy made before: a name of its own
                suffix = base[base.find(",") :] if "," in base else ""
                base = names.next() + suffix
        else:
            raise FileExistsError(f"{into.path}/{CUR}/{destination}")
        placed.append((entry, base))

    lost = _with_retry(files, entries, place)
    if placed:
        into.sync(CUR)
    if move:
        for subdir in {entry.subdir for entry, _ in placed}:
            files.sync(subdir)
        delta.removed = sorted({entry.uid for entry, _ in placed} | {e.uid for e in lost})
    new_uids = _assign_uids(into, state.root, [base for _, base in placed]) if placed else []
    pairs = [(entry.uid, uid) for (entry, _), uid in zip(placed, new_uids)]
    current = uidlist.read(into)
    return delta, (current.uidvalidity if current is not None else 0, pairs)


def read(
    state: FolderState, uids: Sequence[int], whole_limit: int
) -> tuple[Delta, list[tuple[int, bytes | BinaryIO | None]]]:
    """
    The stored bytes (LF form) of each message, whole when smaller than
    C{whole_limit}, else as an open file to stream; C{None} for one that
    is gone (or is a symbolic link, which is not followed).  Sizes and
    dates learnt on the way come back in the delta.
    """
    delta = Delta()
    results: dict[int, bytes | BinaryIO | None] = {}

    def load(entry: Entry) -> None:
        try:
            fd = files.open(entry.name, sub=entry.subdir)
        except SymlinkRefused as e:
            log.warn("not reading {path}: {problem}", path=e.filename, problem=e.strerror,
                     event="folders.unreadable", log_system="folders.unreadable#warn")
            return
        try:
            st = os.fstat(fd)
            data = os.read(fd, whole_limit) if st.st_size < whole_limit else None
        except BaseException:
            os.close(fd)
            raise
        if data is not None and len(data) == st.st_size:
            os.close(fd)
            results[entry.uid] = data
            size = len(data) + data.count(b"\n")
        else:
            results[entry.uid] = os.fdopen(fd, "rb")
            size = entry.size
        if entry.size < 0 or not entry.internaldate:
            learnt = entry.renamed(entry.subdir, entry.name, entry.flags)
            learnt.size = size if size >= 0 else _crlf_size(files, entry)
            learnt.internaldate = st.st_mtime
            delta.resolved.append(learnt)

    entries = [state.entries[uid] for uid in uids if uid in state.entries]
    if entries:
        with state.files() as files:
            _with_retry(files, entries, load)
    return delta, [(uid, results.get(uid)) for uid in uids]


def describe(state: FolderState, uids: Sequence[int]) -> Delta:
    """
    Learn the sizes and dates the state does not know yet (a C{stat} per
    message, and a read for a foreign file whose name has no C{,W=}).
    """
    delta = Delta()

    def learn(entry: Entry) -> None:
        st = files.stat(entry.name, entry.subdir)
        learnt = entry.renamed(entry.subdir, entry.name, entry.flags)
        learnt.internaldate = st.st_mtime
        if learnt.size < 0:
            try:
                learnt.size = _crlf_size(files, entry)
            except SymlinkRefused:
                learnt.size = 0  # never read: FETCH finds it gone
        delta.resolved.append(learnt)

    entries = [
        state.entries[uid]
        for uid in uids
        if uid in state.entries
        and (state.entries[uid].size < 0 or not state.entries[uid].internaldate)
    ]
    if entries:
        with state.files() as files:
            _with_retry(files, entries, learn)
    return delta


def _crlf_size(files: FolderFiles, entry: Entry) -> int:
    size = 0
    with os.fdopen(files.open(entry.name, sub=entry.subdir), "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk) + chunk.count(b"\n")
    return size
