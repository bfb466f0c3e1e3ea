"""
An account's folders on disk: the Maildir is INBOX, and every other folder
a Maildir++ sub-folder of it (C{.Sent}, C{.Archive.2024}) holding a
C{maildirfolder} file, as Dovecot and Courier lay them out; subscriptions
in the C{subscriptions} file, in Dovecot's version 2 format (C{V<TAB>2},
an empty line, then one name per line with its levels separated by tabs).

Blocking file work for a worker thread.  Folders are made 0700 and a
symbolic link in the account's Maildir is never taken for a folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mailserver.folders import names as N
from mailserver.folders import uidlist
from mailserver.interfaces import FolderError
from mailserver.maildir import ensure_maildir

__all__ = ["FolderError"]

# Folders every account gets at its first login, with the SPECIAL-USE
# attribute (RFC 6154) each is marked with.
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
# Also marked when a user makes them.
_OTHER_SPECIAL = {"Archive": "\\Archive"}
SUBSCRIPTIONS = "subscriptions"
_SUBSCRIPTIONS_HEADER = "V\t2\n\n"
_MARKER = "maildirfolder"
_DELETING = ".DOVECOT-TRASHED"


def special_use(name: str) -> str | None:
    return SPECIAL_USE.get(name) or _OTHER_SPECIAL.get(name)


def folder_path(root: str, name: str) -> str:
    return os.path.join(root, N.directory(name)) if name != N.INBOX else root


def _make_maildir(path: str) -> None:
    for sub in ("", "tmp", "new", "cur"):
        try:
            os.mkdir(os.path.join(path, sub), 0o700)
        except FileExistsError:
            pass
    marker = os.path.join(path, _MARKER)
    if not os.path.exists(marker):
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
    for folder in (path, os.path.dirname(path)):
        uidlist.sync_directory(folder)


def exists(root: str, name: str) -> bool:
    path = folder_path(root, name)
    return not os.path.islink(path) and os.path.isdir(os.path.join(path, "cur"))


def prepare(base: str, root: str) -> None:
    """
    The first login's set-up: INBOX, and the special folders (subscribed)
    where they are missing.  Cheap when done already.

    @param base: the data folder, below which no link is followed.
    """
    ensure_maildir(Path(base), Path(root))
    missing = [name for name in SPECIAL_USE if not exists(root, name)]
    for name in missing:
        _make_maildir(folder_path(root, name))
    if missing:
        subscribed = read_subscriptions(root)
        if not subscribed:
            write_subscriptions(root, [N.INBOX, *SPECIAL_USE])


def list_names(root: str) -> list[str]:
    """
    INBOX and every folder's name, in no particular order.
    """
    found = [N.INBOX]
    with os.scandir(root) as entries:
        for entry in entries:
            name = N.from_directory(entry.name)
            if name is None or entry.name.startswith(_DELETING):
                continue
            if entry.is_dir(follow_symlinks=False) and os.path.isdir(os.path.join(entry.path, "cur")):
                found.append(name)
    return found


def create(root: str, name: str) -> None:
    """
    Make a folder, and the folders above it that are missing (RFC 3501
    6.3.3).

    @raise FolderError: it exists, or the name is not allowed.
    """
    name = _checked(name)
    if name == N.INBOX or exists(root, name):
        raise FolderError("ALREADYEXISTS", "Mailbox already exists")
    for parent in N.parent_names(name):
        if not exists(root, parent):
            _make_maildir(folder_path(root, parent))
    _make_maildir(folder_path(root, name))


def delete(root: str, name: str) -> None:
    """
    Remove a folder and its messages (not its children, which stay as
    folders of their own).  The folder is first renamed out of sight, so a
    crash midway leaves no half-deleted folder behind.
    """
    name = _checked(name)
    if name == N.INBOX:
        raise FolderError("CANNOT", "INBOX can't be deleted")
    if not exists(root, name):
        raise FolderError("NONEXISTENT", "Mailbox doesn't exist")
    path = folder_path(root, name)
    doomed = os.path.join(root, f"{_DELETING}.{os.getpid()}.{os.path.basename(path)}")
    os.rename(path, doomed)
    uidlist.sync_directory(root)
    shutil.rmtree(doomed, ignore_errors=True)
    set_subscribed(root, name, False)


def rename(root: str, old: str, new: str) -> None:
    """
    Rename a folder and its children (RFC 3501 6.3.5).  Renaming INBOX
    moves its messages into the new folder and leaves INBOX empty.
    """
    old = _checked(old)
    new = _checked(new)
    if not exists(root, old) and old != N.INBOX:
        raise FolderError("NONEXISTENT", "Mailbox doesn't exist")
    if new == N.INBOX or exists(root, new):
        raise FolderError("ALREADYEXISTS", "Target mailbox already exists")
    if new.startswith(old + N.SEPARATOR) and old != N.INBOX:
        raise FolderError("CANNOT", "Can't rename a mailbox under itself")
    for parent in N.parent_names(new):
        if not exists(root, parent):
            _make_maildir(folder_path(root, parent))
    if old == N.INBOX:
        _move_inbox(root, new)
        return
    children = [n for n in list_names(root) if n.startswith(old + N.SEPARATOR)]
    os.rename(folder_path(root, old), folder_path(root, new))
    for child in children:
        renamed = new + child[len(old) :]
        os.rename(folder_path(root, child), folder_path(root, renamed))
    uidlist.sync_directory(root)
    subscribed = read_subscriptions(root)
    moved = [
        new + n[len(old) :] if n == old or n.startswith(old + N.SEPARATOR) else n
        for n in subscribed
    ]
    if moved != subscribed:
        write_subscriptions(root, moved)


def _move_inbox(root: str, new: str) -> None:
    target = folder_path(root, new)
    _make_maildir(target)
    for subdir in ("new", "cur"):
        for file_name in os.listdir(os.path.join(root, subdir)):
            if file_name[:1] != ".":
                os.rename(os.path.join(root, subdir, file_name), os.path.join(target, subdir, file_name))
        uidlist.sync_directory(os.path.join(target, subdir))
        uidlist.sync_directory(os.path.join(root, subdir))


def _checked(name: str) -> str:
    try:
        return N.check(name)
    except N.BadName as e:
        raise FolderError("CANNOT", str(e)) from None


# Subscriptions.


def read_subscriptions(root: str) -> list[str]:
    try:
        with open(os.path.join(root, SUBSCRIPTIONS), "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    if text.startswith(_SUBSCRIPTIONS_HEADER):
        body = text[len(_SUBSCRIPTIONS_HEADER) :]
        return [N.normalize(line.replace("\t", N.SEPARATOR)) for line in body.splitlines() if line]
    # Version 1: one name per line, levels separated by the storage's '.'.
    return [N.normalize(line.replace(".", N.SEPARATOR)) for line in text.splitlines() if line]


def write_subscriptions(root: str, subscribed: list[str]) -> None:
    path = os.path.join(root, SUBSCRIPTIONS)
    temporary = path + f".{os.getpid()}.tmp"
    lines = "".join(name.replace(N.SEPARATOR, "\t") + "\n" for name in dict.fromkeys(subscribed))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (_SUBSCRIPTIONS_HEADER + lines).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def set_subscribed(root: str, name: str, subscribed: bool) -> None:
    """
    RFC 3501 6.3.6-7: a name may be subscribed whether or not it exists.
    """
    name = N.normalize(name)
    current = read_subscriptions(root)
    if subscribed and name not in current:
        write_subscriptions(root, [*current, name])
    elif not subscribed and name in current:
        write_subscriptions(root, [n for n in current if n != name])
