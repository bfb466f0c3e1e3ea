"""
The data folder belongs to the user the server runs as.

C{twistd --uid/--gid} starts the server as root and drops to that user only
after the listeners are bound, so what the server makes while it builds
itself (the data folder, the self-signed certificate, the queue and spool
folders) is made with that user's effective ids (L{acting_as}): nothing in
the folder is left to root.  The console script, run as root on a data
folder that belongs to another user, becomes that user before it does
anything (L{become_owner_of}), for the same reason.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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
    Make the data folder (for C{owner}, when given), or check that the
    existing one is C{owner}'s: a folder of root's or of another user would
    fail at the first file the server writes after dropping privileges.

    @raise DataFolderError: it belongs to someone else.
    """
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.mkdir(parents=True)  # parents belong to the starting user
    else:
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)
        return
    if owner is None:
        return
    found = Owner(path.stat().st_uid, path.stat().st_gid)
    if found.uid != owner.uid:
        folder = path.resolve()
        raise DataFolderError(
            f"the data folder {folder} belongs to {found.name}, but the server "
            f"runs as {owner.name}: chown -R {owner.name}:{owner.group} {folder}"
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
