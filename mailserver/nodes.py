"""
Several servers sharing one data folder (on one machine, or on several
through a network file system): each is a node, with a name (C{node_name})
and a folder of its own, C{<data_dir>/nodes/<name>/}, for what must not be
shared: its relay queue, its defences database, its process id, its
listener report and its lock.  The mailboxes, the spool, the users and
aliases files, the TLS and DKIM keys and the MTA-STS cache are shared.

The lock (C{nodes/<name>/lock}) is an exclusive C{flock} that the node's
primary process holds for as long as it runs:

  - a second server started with the same node name stops at once, since
    two relays working one queue would send its messages twice;
  - a node that can take another node's lock knows that node is not
    running, and may adopt its queue (L{mailserver.relay.adoption}).

The kernel lets go of a C{flock} when its process dies, C{kill -9} too; on
NFS version 4 the server lets go of a client's locks when the client stops
renewing its lease (a crashed or cut-off machine: 90 seconds by default).
Where C{flock} is only local (NFS version 3 without C{lockd}, a mount with
C{nolock} or C{local_lock=flock}), it cannot tell nodes apart: such a
folder is for one node only (README, "Several servers, one data folder").

The one-node layout of earlier versions (C{<data_dir>/queue/},
C{<data_dir>/defences.sqlite}) is moved into the node's folder when the
node starts, each with one rename.

Blocking file work without Twisted: the composition root and the relay's
adoption call it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from mailserver.maildir import fsync_directory
from mailserver.safe_fs import open_folder, open_path

LOCK_NAME = "lock"
# Files of the one-node layout that are the node's own now.
_DEFENCES_FILES = ("defences.sqlite", "defences.sqlite-wal", "defences.sqlite-shm")


class NodeInUse(Exception):
    """
    Another running server has this node's name; the message says so in
    one line.
    """


@dataclass
class NodeLock:
    """
    A node's lock, held through C{fd} until L{release}.
    """

    node: str
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def try_lock(base: Path, node_path: Path) -> NodeLock | None:
    """
    Take the node's lock without waiting: the lock, or C{None} when a
    running node holds it.  The node's folder and lock file are made if
    missing (a node that never ran, or was moved here from the one-node
    layout); no link is followed below C{base}, the data folder.
    """
    folder = open_folder(base, node_path, create=True)
    os.close(folder)
    # Read-only where that will do (a file held open for writing keeps its
    # file system from being remounted read-only); NFS, which takes a
    # flock as a lock on the whole file, wants it open for writing.
    path = node_path / LOCK_NAME
    fd = open_path(path, os.O_RDONLY | os.O_CREAT)
    try:
        taken = _flock(fd)
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EBADF:
            raise
        fd = open_path(path, os.O_RDWR | os.O_CREAT)
        try:
            taken = _flock(fd)
        except BaseException:
            os.close(fd)
            raise
    if not taken:
        os.close(fd)
        return None
    return NodeLock(node_path.name, fd)


def _flock(fd: int) -> bool:
    """
    Whether the exclusive lock on C{fd} was taken (False: someone holds it).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def node_names(nodes_path: Path) -> list[str]:
    """
    The nodes that have a folder in C{nodes_path}.
    """
    try:
        entries = list(os.scandir(nodes_path))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


def claim(base: Path, node_path: Path) -> NodeLock:
    """
    Take this node's lock for the life of the process and move the
    one-node layout's files into its folder.

    @raise NodeInUse: when another server runs with this node name.
    """
    lock = try_lock(base, node_path)
    if lock is None:
        raise NodeInUse(
            f"another server is running as node {node_path.name!r} on this data folder "
            f"(it holds {node_path / LOCK_NAME}); give each server its own node_name")
    try:
        adopt_single_node_layout(base, node_path)
    except BaseException:
        lock.release()
        raise
    return lock


def adopt_single_node_layout(base: Path, node_path: Path) -> list[str]:
    """
    Move C{<base>/queue} and the defences database into the node's folder
    when the node has none yet (each one rename: a crash leaves it in one
    place or the other).  Returns the names moved.
    """
    moved = []
    for name in ("queue", *_DEFENCES_FILES):
        source, target = base / name, node_path / name
        if not os.path.lexists(source) or os.path.lexists(target):
            continue
        if name == "queue" and not os.path.isdir(source / "envelopes"):
            continue
        os.rename(source, target)
        moved.append(name)
    if moved:
        fsync_directory(node_path)
        fsync_directory(base)
    return moved


__all__ = ["LOCK_NAME", "NodeInUse", "NodeLock", "adopt_single_node_layout", "claim",
           "node_names", "try_lock"]
