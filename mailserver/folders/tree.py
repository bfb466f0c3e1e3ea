"""
An account's folders on disk: the Maildir is INBOX, and every other folder
a Maildir++ sub-folder of it (C{.Sent}, C{.Archive.2024}) holding a
C{maildirfolder} file, as Dovecot and Courier lay them out; subscriptions
in the C{subscriptions} file, in Dovecot's version 2 format (C{V<TAB>2},
an empty line, then one name per line with its levels separated by tabs).

Blocking file work for a worker thread.  Folders are made 0700, and every
folder and file is reached from the data folder without following a
symbolic link (L{FolderFiles}): a link in the account's Maildir is never
taken for a folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mailserver.folders import names as N
from mailserver.folders.disk import FolderFiles
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


def _make_maildir(account: FolderFiles, name: str) -> None:
    """
    Make the folder C{name} of the account (its C{tmp/}, C{new/}, C{cur/}
    and C{maildirfolder} file) where missing, every new name synced.
    """
    path = folder_path(account.path, name)
    ensure_maildir(Path(account.base), Path(path))
    with FolderFiles(account.base, path) as folder:
        try:
            folder.stat(_MARKER)
        except FileNotFoundError:
            os.close(folder.open(_MARKER, os.O_WRONLY | os.O_CREAT))
            folder.sync()


def _exists(account: FolderFiles, name: str) -> bool:
    return name == N.INBOX or account.is_folder(N.directory(name))


def exists(base: str, root: str, name: str) -> bool:
    """
    Is there a folder C{name} in the account at C{root} (inside the data
    folder C{base})?
    """
    try:
        with FolderFiles(base, root) as account:
            return _exists(account, name)
    except FileNotFoundError:
        return False


def prepare(base: str, root: str) -> None:
    """
    The first login's set-up: INBOX, and the special folders (subscribed)
    where they are missing.  Cheap when done already.

    @param base: the data folder, below which no link is followed.
    """
    ensure_maildir(Path(base), Path(root))
    with FolderFiles(base, root) as account:
        missing = [name for name in SPECIAL_USE if not _exists(account, name)]
        for name in missing:
            _make_maildir(account, name)
        if missing and not _read_subscriptions(account):
            _write_subscriptions(account, [N.INBOX, *SPECIAL_USE])


def list_names(base: str, root: str) -> list[str]:
    """
    INBOX and every folder's name, in no particular order.
    """
    found = [N.INBOX]
    with FolderFiles(base, root) as account:
        with os.scandir(account.fd) as entries:
            candidates = [
                (entry.name, name)
                for entry in entries
                if (name := N.from_directory(entry.name)) is not None
                and not entry.name.startswith(_DELETING)
                and entry.is_dir(follow_symlinks=False)
            ]
        found += [name for directory, name in candidates if account.is_folder(directory)]
    return found


def create(base: str, root: str, name: str) -> None:
    """
    Make a folder, and the folders above it that are missing (RFC 3501
    6.3.3).

    @raise FolderError: it exists, or the name is not allowed.
    """
    name = _checked(name)
    with FolderFiles(base, root) as account:
        if _exists(account, name):
            raise FolderError("ALREADYEXISTS", "Mailbox already exists")
        for parent in N.parent_names(name):
            if not _exists(account, parent):
                _make_maildir(account, parent)
        _make_maildir(account, name)


def delete(base: str, root: str, name: str) -> None:
    """
    Remove a folder and its messages (not its children, which stay as
    folders of their own).  The folder is first renamed out of sight, so a
    crash midway leaves no half-deleted folder behind.
    """
    name = _checked(name)
    if name == N.INBOX:
        raise FolderError("CANNOT", "INBOX can't be deleted")
    with FolderFiles(base, root) as account:
        if not _exists(account, name):
            raise FolderError("NONEXISTENT", "Mailbox doesn't exist")
        directory = N.directory(name)
        doomed = f"{_DELETING}.{os.getpid()}.{directory}"
        os.rename(directory, doomed, src_dir_fd=account.fd, dst_dir_fd=account.fd)
        account.sync()
        # Relative to the account's folder, and never through a link.
        shutil.rmtree(doomed, ignore_errors=True, dir_fd=account.fd)
        _set_subscribed(account, name, False)


def rename(base: str, root: str, old: str, new: str) -> None:
    """
    Rename a folder and its children (RFC 3501 6.3.5).  Renaming INBOX
    moves its messages into the new folder and leaves INBOX empty.
    """
    old = _checked(old)
    new = _checked(new)
    with FolderFiles(base, root) as account:
        if not _exists(account, old):
            raise FolderError("NONEXISTENT", "Mailbox doesn't exist")
        if _exists(account, new):
            raise FolderError("ALREADYEXISTS", "Target mailbox already exists")
        if new.startswith(old + N.SEPARATOR) and old != N.INBOX:
            raise FolderError("CANNOT", "Can't rename a mailbox under itself")
        for parent in N.parent_names(new):
            if not _exists(account, parent):
                _make_maildir(account, parent)
        if old == N.INBOX:
            _move_inbox(account, new)
            return
        children = [n for n in list_names(base, root) if n.startswith(old + N.SEPARATOR)]
        for was, now in [(old, new)] + [(child, new + child[len(old) :]) for child in children]:
            os.rename(
                N.directory(was), N.directory(now), src_dir_fd=account.fd, dst_dir_fd=account.fd
            )
        account.sync()
        subscribed = _read_subscriptions(account)
        moved = [
            new + n[len(old) :] if n == old or n.startswith(old + N.SEPARATOR) else n
            for n in subscribed
        ]
        if moved != subscribed:
            _write_subscriptions(account, moved)


def _move_inbox(account: FolderFiles, new: str) -> None:
    _make_maildir(account, new)
    with FolderFiles(account.base, folder_path(account.path, new)) as target:
        for subdir in ("new", "cur"):
            for file_name in account.listdir(subdir):
                if file_name[:1] != ".":
                    os.rename(
                        file_name, file_name,
                        src_dir_fd=account.sub(subdir), dst_dir_fd=target.sub(subdir),
                    )
            target.sync(subdir)
            account.sync(subdir)


def _checked(name: str) -> str:
    try:
        return N.check(name)
    except N.BadName as e:
        raise FolderError("CANNOT", str(e)) from None


# Subscriptions.


def read_subscriptions(base: str, root: str) -> list[str]:
    with FolderFiles(base, root) as account:
        return _read_subscriptions(account)


def _read_subscriptions(account: FolderFiles) -> list[str]:
    try:
        text = account.read(SUBSCRIPTIONS).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    if text.startswith(_SUBSCRIPTIONS_HEADER):
        body = text[len(_SUBSCRIPTIONS_HEADER) :]
        return [N.normalize(line.replace("\t", N.SEPARATOR)) for line in body.splitlines() if line]
    # Version 1: one name per line, levels separated by the storage's '.'.
    return [N.normalize(line.replace(".", N.SEPARATOR)) for line in text.splitlines() if line]


def _write_subscriptions(account: FolderFiles, subscribed: list[str]) -> None:
    lines = "".join(name.replace(N.SEPARATOR, "\t") + "\n" for name in dict.fromkeys(subscribed))
    account.write_durably(SUBSCRIPTIONS, (_SUBSCRIPTIONS_HEADER + lines).encode("utf-8"))


def set_subscribed(base: str, root: str, name: str, subscribed: bool) -> None:
    """
    RFC 3501 6.3.6-7: a name may be subscribed whether or not it exists,
    but only a name that could be a folder (the file has a name a line, so
    a line break in one would subscribe several; and names stay short).
    """
    if subscribed:
        name = _checked(name)
    with FolderFiles(base, root) as account:
        _set_subscribed(account, name, subscribed)


def _set_subscribed(account: FolderFiles, name: str, subscribed: bool) -> None:
    name = N.normalize(name)
    current = _read_subscriptions(account)
    if subscribed and name not in current:
        _write_subscriptions(account, [*current, name])
    elif not subscribed and name in current:
        _write_subscriptions(account, [n for n in current if n != name])
