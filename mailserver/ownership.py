"""
The data folder belongs to the user the server runs as.

C{twistd --uid/--gid} starts the server as root and drops to that user only
after the listeners are bound, so what the server makes while it builds
itself (the data folder, the self-signed certificate, the queue and spool
folders) is made with that user's effective ids (L{acting_as}): nothing in
the folder is left to root.  The console script, run as root on a data
folder that belongs to another user, becomes that user before it does
anything (L{become_owner_of}), for the same reason.  The folders the
server keeps there are its own: private (0700) and never symbolic links.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from mailserver.safe_fs import OTHERS, make_data_folder, tighten

_log = Logger()


class DataFolderError(Exception):
    """
    The data folder cannot be used by the server's user; the message says
    what to do.
    """


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def group(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


def server_owner(uid: int | None, gid: int | None) -> Owner | None:
    """
    The user C{twistd} will switch to (its C{--uid} and C{--gid}, the
    user's own group when only C{--uid} is given) when this process is root;
    C{None} when nothing will be switched.
    """
    if uid is None or os.geteuid() != 0 or uid == 0:
        return None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getegid()
    return Owner(uid, gid)


def prepare_data_folder(path: Path, owner: Owner | None) -> None:
    """
    Make the data folder (0700, for C{owner} when given), or check that the
    existing one is C{owner}'s: a folder of root's or of another user would
    fail at the first file the server writes after dropping privileges.
    Then see that its own folders are private (L{keep_private}).

    @raise DataFolderError: it belongs to someone else.
    @raise mailserver.safe_fs.SymlinkRefused: one of its own folders is a
        symbolic link.
    """
    if make_data_folder(path):  # parents belong to the starting user
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)
    elif owner is not None:
        found = Owner(path.stat().st_uid, path.stat().st_gid)
        if found.uid != owner.uid:
            folder = path.resolve()
            raise DataFolderError(
                f"the data folder {folder} belongs to {found.name}, but the server "
                f"runs as {owner.name}: chown -R {owner.name}:{owner.group} {folder}"
            )
    keep_private(path)


# The data folder's own folders: never symbolic links, and private.
OWN_FOLDERS = ("mail", "spool", "nodes", "queue", "tls", "dkim", "mta-sts")


def keep_private(path: Path) -> None:
    """
    Refuse to start when one of the data folder's own folders is a symbolic
    link; take other users' access away from those that still grant it
    (made before the server made its folders 0700), and log it.

    @raise mailserver.safe_fs.SymlinkRefused: naming the link.
    """
    for name in OWN_FOLDERS:
        old = tighten(path, path / name)
        if old is not None:
            _log.warn(
                "{folder} was open to other users (mode {old:o}): now {new:o}",
                folder=str(path / name), old=old, new=old & ~OTHERS,
                event="server.folder_tightened", log_system="server.folder_tightened#warn",
            )


@contextmanager
def acting_as(owner: Owner | None) -> Iterator[None]:
    """
    Create files as C{owner} (effective ids only, so root comes back after).
    """
    if owner is None or os.geteuid() != 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([owner.gid])
    os.setegid(owner.gid)
    os.seteuid(owner.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def become_owner_of(path: Path) -> Owner | None:
    """
    When run as root on a folder that belongs to another user: become that
    user for good (groups, gid, uid), so every file made from here on is
    theirs.  Returns whom we became, or C{None} when nothing changed.
    """
    if os.geteuid() != 0:
        return None
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if status.st_uid == 0:
        return None
    owner = Owner(status.st_uid, status.st_gid)
    try:
        os.initgroups(pwd.getpwuid(owner.uid).pw_name, owner.gid)
    except KeyError:
        os.setgroups([owner.gid])
    os.setgid(owner.gid)
    os.setuid(owner.uid)
    return owner
