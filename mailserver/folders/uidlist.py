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

Everything here is blocking file work for a worker thread.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass, field

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


def file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        return _stamp(os.stat(path))
    except FileNotFoundError:
        return None


def read(folder: str) -> UidList | None:
    """
    The folder's list, or C{None} if it has none (or its header is not
    one we understand: it is then written anew, with a new UIDVALIDITY,
    as Dovecot does).  Malformed records and a partly written last line
    are skipped.
    """
    path = os.path.join(folder, UIDLIST)
    try:
        with open(path, "rb") as f:
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


def rewrite(folder: str, uidlist: UidList) -> None:
    """
    Write the whole list durably: a temporary file, synced, renamed over
    the old one, and the folder synced.  Hold the lock.
    """
    temporary = os.path.join(folder, UIDLIST + ".tmp")
    ordered = sorted(uidlist.uids.items(), key=lambda item: item[1])
    text = _header(uidlist) + "".join(f"{uid} :{name}\n" for name, uid in ordered)
    _write_durably(temporary, text.encode("utf-8"))
    os.rename(temporary, os.path.join(folder, UIDLIST))
    sync_directory(folder)
    uidlist.stamp = file_stamp(os.path.join(folder, UIDLIST))
    uidlist.records = len(ordered)


def append(folder: str, uidlist: UidList, added: list[tuple[str, int]]) -> None:
    """
    Add records to the end of the list and sync them; the list must exist
    and C{uidlist} be what it holds (read under the lock).  Hold the lock.
    """
    path = os.path.join(folder, UIDLIST)
    data = "".join(f"{uid} :{name}\n" for name, uid in added).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
        uidlist.stamp = _stamp(os.fstat(fd))
    finally:
        os.close(fd)
    for name, uid in added:
        uidlist.uids[name] = uid
    uidlist.records += len(added)


def _write_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Lock:
    """
    The uidlist's dot-lock, as Dovecot takes it: a C{dovecot-uidlist.lock}
    file created exclusively, holding C{pid:host}; one left by a crash is
    taken over once it is L{STALE_LOCK_SECONDS} old.  A context manager;
    waits (in the worker thread) up to C{wait} seconds.
    """

    def __init__(self, folder: str, wait: float = LOCK_WAIT_SECONDS) -> None:
        self._path = os.path.join(folder, UIDLIST + _LOCK_SUFFIX)
        self._wait = wait

    def __enter__(self) -> Lock:
        deadline = time.monotonic() + self._wait
        content = f"{os.getpid()}:{socket.gethostname()}".encode()
        pause = 0.005
        while True:
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if self._stale():
                    continue
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{self._path} is held by another process") from None
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
            age = time.time() - os.stat(self._path).st_mtime
        except FileNotFoundError:
            return True
        if age < STALE_LOCK_SECONDS:
            return False
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        return True

    def __exit__(self, *exc_info) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


def next_uidvalidity(root: str) -> int:
    """
    A UIDVALIDITY for a new folder of the account at C{root}: the time, or
    one more than the last one given out if that is not less, recorded in
    C{dovecot-uidvalidity}.
    """
    path = os.path.join(root, UIDVALIDITY)
    try:
        with open(path, "rb") as f:
            last = int(f.read().strip() or b"0", 16)
    except (FileNotFoundError, ValueError):
        last = 0
    value = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
    temporary = path + f".{os.getpid()}.tmp"
    _write_durably(temporary, f"{value:08x}\n".encode("ascii"))
    os.rename(temporary, path)
    return value


def read_keywords(folder: str) -> list[str]:
    """
    Keyword names by index (letter C{a} is index 0); missing file, none.
    """
    try:
        with open(os.path.join(folder, KEYWORDS), "rb") as f:
            text = f.read().decode("utf-8", "replace")
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


def write_keywords(folder: str, names: list[str]) -> None:
    """
    Record the keyword names durably.  Hold the uidlist lock.
    """
    path = os.path.join(folder, KEYWORDS)
    temporary = path + ".tmp"
    text = "".join(f"{n} {name}\n" for n, name in enumerate(names) if name)
    _write_durably(temporary, text.encode("utf-8"))
    os.rename(temporary, path)
