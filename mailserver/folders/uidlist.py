"""
The files that keep a folder's IMAP identity, in Dovecot's formats so a
Maildir Dovecot has written or will read stays valid:

  - C{dovecot-uidlist}: UIDVALIDITY, the next UID and each message's UID
    by the base of its file name (the name up to C{:}).  Version 3::

        3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1
        25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394

    Records are appended as messages get UIDs (one write and an
    C{fdatasync} under the lock); the file is written anew, to a temporary
    file renamed over it, when it is new or a quarter of its records name
    messages that are gone.
  - C{dovecot-uidlist.lock}: the dot-lock every writer of the list takes
    (created with C{O_EXCL}; one older than two minutes is stale).
  - C{dovecot-keywords}: keyword names by the letter (C{a}-C{z}) that
    stands for them in file names, one C{<n> <name>} per line.
  - C{dovecot-uidvalidity} in the account's Maildir: the last UIDVALIDITY
    given out (hex), so a folder deleted and created again gets a new one.

Everything here is blocking file work for a worker thread, on a folder
opened for the job (L{FolderFiles}: no link is followed).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass, field

from mailserver.folders.disk import MAKE, FolderFiles, write_all

UIDLIST = "dovecot-uidlist"
KEYWORDS = "dovecot-keywords"
UIDVALIDITY = "dovecot-uidvalidity"
_LOCK_SUFFIX = ".lock"
# Dovecot's MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT.
STALE_LOCK_SECONDS = 120
LOCK_WAIT_SECONDS = 30.0
MAX_KEYWORDS = 26


class LockTimeout(OSError):
    """
    Another writer held the uidlist lock for too long.
    """


@dataclass
class UidList:
    """
    A folder's UID list as read from (or about to be written to) disk.

    @ivar uids: UID by file name base.
    @ivar stamp: the file's identity when read (inode, size, mtime), to
        tell whether another process has written it since.
    @ivar records: lines in the file (records of gone messages included).
    """

    uidvalidity: int
    next_uid: int
    guid: str = field(default_factory=lambda: secrets.token_hex(16))
    uids: dict[str, int] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None
    records: int = 0


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_stamp(folder: FolderFiles) -> tuple[int, int, int] | None:
    """
    The uidlist's identity now, or C{None} if there is none.
    """
    try:
        return _stamp(folder.stat(UIDLIST))
    except FileNotFoundError:
        return None


def read(folder: FolderFiles) -> UidList | None:
    """
    The folder's list, or C{None} if it has none (or its header is not
    one we understand: it is then written anew, with a new UIDVALIDITY,
    as Dovecot does).  Malformed records and a partly written last line
    are skipped.
    """
    try:
        with os.fdopen(folder.open(UIDLIST), "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            data = f.read()
    except FileNotFoundError:
        return None
    text = data.decode("utf-8", "replace")
    end = text.rfind("\n")
    lines = text[: end + 1].split("\n") if end >= 0 else []
    if not lines:
        return None
    header = lines[0].split(" ")
    if header[0] != "3":
        return None
    fields = {item[:1]: item[1:] for item in header[1:] if item}
    try:
        uidvalidity = int(fields["V"])
        next_uid = int(fields.get("N", "1"))
    except (KeyError, ValueError):
        return None
    uids: dict[str, int] = {}
    last = 0
    records = 0
    for line in lines[1:]:
        head, colon, name = line.partition(" :")
        if not colon:
            head, colon, name = line.partition(":")
        number = head.split(" ", 1)[0]
        if not (colon and name and number.isdigit()) or "/" in name:
            continue
        uid = int(number)
        if uid <= last or uid >= 2**32 - 1:
            continue  # Dovecot takes UIDs out of order as a broken file
        last = uid
        records += 1
        uids[name] = uid
    return UidList(
        uidvalidity=uidvalidity,
        next_uid=max(next_uid, last + 1),
        guid=fields.get("G", "") or secrets.token_hex(16),
        uids=uids,
        stamp=stamp,
        records=records,
    )


def _header(uidlist: UidList) -> str:
    return f"3 V{uidlist.uidvalidity} N{uidlist.next_uid} G{uidlist.guid}\n"


def rewrite(folder: FolderFiles, uidlist: UidList) -> None:
    """
    Write the whole list durably: a temporary file, synced, renamed over
    the old one, and the folder synced.  Hold the lock.
    """
    ordered = sorted(uidlist.uids.items(), key=lambda item: item[1])
    text = _header(uidlist) + "".join(f"{uid} :{name}\n" for name, uid in ordered)
    folder.write_durably(UIDLIST, text.encode("utf-8"))
    uidlist.stamp = file_stamp(folder)
    uidlist.records = len(ordered)


def append(folder: FolderFiles, uidlist: UidList, added: list[tuple[str, int]]) -> None:
    """
    Add records to the end of the list and sync them; the list must exist
    and C{uidlist} be what it holds (read under the lock).  Hold the lock.
    """
    data = "".join(f"{uid} :{name}\n" for name, uid in added).encode("utf-8")
    fd = folder.open(UIDLIST, os.O_WRONLY | os.O_APPEND)
    try:
        write_all(fd, data)
        os.fdatasync(fd)
        uidlist.stamp = _stamp(os.fstat(fd))
    finally:
        os.close(fd)
    for name, uid in added:
        uidlist.uids[name] = uid
    uidlist.records += len(added)


class Lock:
    """
    The uidlist's dot-lock, as Dovecot takes it: a C{dovecot-uidlist.lock}
    file created exclusively, holding C{pid:host}; one left by a crash is
    taken over once it is L{STALE_LOCK_SECONDS} old.  A context manager;
    waits (in the worker thread) up to C{wait} seconds.
    """

    def __init__(self, folder: FolderFiles, wait: float = LOCK_WAIT_SECONDS) -> None:
        self._folder = folder
        self._name = UIDLIST + _LOCK_SUFFIX
        self._wait = wait

    def __enter__(self) -> Lock:
        deadline = time.monotonic() + self._wait
        content = f"{os.getpid()}:{socket.gethostname()}".encode()
        pause = 0.005
        while True:
            try:
                fd = self._folder.open(self._name, MAKE)
            except FileExistsError:
                if self._stale():
                    continue
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"{self._folder.path}/{self._name} is held by another process"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
            return self

    def _stale(self) -> bool:
        try:
            age = time.time() - self._folder.stat(self._name).st_mtime
        except FileNotFoundError:
            return True
        if age < STALE_LOCK_SECONDS:
            return False
        try:
            self._folder.unlink(self._name)
        except FileNotFoundError:
            pass
        return True

    def __exit__(self, *exc_info) -> None:
        try:
            self._folder.unlink(self._name)
        except FileNotFoundError:
            pass


def next_uidvalidity(base: str, root: str) -> int:
    """
    A UIDVALIDITY for a new folder of the account at C{root} (inside the
    data folder C{base}): the time, or one more than the last one given
    out if that is not less, recorded in C{dovecot-uidvalidity}.
    """
    with FolderFiles(base, root) as account:
        try:
            last = int(account.read(UIDVALIDITY).strip() or b"0", 16)
        except (FileNotFoundError, ValueError):
            last = 0
        value = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
        account.write_durably(UIDVALIDITY, f"{value:08x}\n".encode("ascii"))
    return value


def read_keywords(folder: FolderFiles) -> list[str]:
    """
    Keyword names by index (letter C{a} is index 0); missing file, none.
    """
    try:
        text = folder.read(KEYWORDS).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    names: list[str] = [""] * MAX_KEYWORDS
    for line in text.splitlines():
        number, _, name = line.partition(" ")
        if number.isdigit() and int(number) < MAX_KEYWORDS and name:
            names[int(number)] = name
    while names and not names[-1]:
        names.pop()
    return names


def write_keywords(folder: FolderFiles, names: list[str]) -> None:
    """
    Record the keyword names durably.  Hold the uidlist lock.
    """
    text = "".join(f"{n} {name}\n" for n, name in enumerate(names) if name)
    folder.write_durably(KEYWORDS, text.encode("utf-8"))
