"""
A node that is gone for good leaves its relay queue in its folder
(C{nodes/<name>/queue/}, L{mailserver.nodes}); C{mailserver queue adopt
NAME} moves it into this node's queue.

Nothing moves it by itself: a node that is only stopped (an upgrade, a
reboot) takes its queue up again when it starts, and a machine that is cut
off from the shared folder may still be running.  The operator says when a
node is gone; the adoption then holds that node's lock throughout, so it is
refused while the node runs, and the node cannot start while it goes on.

Each message moves in three steps, in an order that leaves it queued on
exactly one node whatever the moment of a crash:

  1. its message file is hard-linked into this queue's C{messages/} (and
     the folder synced): until the envelope comes, an orphan that start-up
     removes, never a message;
  2. its envelope is renamed into this queue's C{envelopes/}, the commit
     point (both folders synced);
  3. the other node's link to the message file is removed: an orphan there
     otherwise, removed by that node's start-up.

A whole entry (a message file holding its envelope,
L{mailserver.relay.queue}) moves in one step, a rename into this queue's
C{messages/} (both folders synced).

Each moved message is announced (C{incoming/}), so the running server
takes it in at its next scan (every C{relay.scan_interval}).  Blocking file work without Twisted, for the CLI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mailserver.maildir import fsync_directory
from mailserver.nodes import try_lock
from mailserver.relay.queue import CorruptEntry, QueueError, QueueStore
from mailserver.relay.whole_entry import mark_stale
from mailserver.safe_fs import open_folder


class AdoptionRefused(QueueError):
    """
    The queue cannot be adopted (its node runs, or it is this node's).
    """


@dataclass
class Adopted:
    """
    What an adoption did: the ids moved, and those left behind (an id this
    queue already has, an entry that vanished meanwhile), with why.
    """

    moved: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def adopt_queue(base: Path, nodes_path: Path, own: QueueStore, node: str) -> Adopted:
    """
    Move every queued message of C{node} into C{own}, this node's queue.

    @param base: the data folder, below which no link is followed.
    @raise AdoptionRefused: when C{node} is running (holds its lock), has no
        folder, is this node or is no node name.
    """
    if not node or node.startswith(".") or "/" in node:
        raise AdoptionRefused(f"{node!r} is not a node name")
    node_path = nodes_path / node
    if node_path == own.path.parent:
        raise AdoptionRefused(f"{node!r} is this node: its queue is already this one")
    if not os.path.isdir(node_path) or os.path.islink(node_path):
        raise AdoptionRefused(f"no node {node!r} in {nodes_path}")
    lock = try_lock(base, node_path)
    if lock is None:
        raise AdoptionRefused(
            f"node {node!r} is running (it holds {node_path / 'lock'}); stop it first")
    try:
        return _move_all(base, QueueStore(node_path / "queue"), own)
    finally:
        lock.release()


def _move_all(base: Path, theirs: QueueStore, own: QueueStore) -> Adopted:
    done = Adopted()
    ids = theirs.ids()
    if not ids:
        return done
    # No link is followed below the data folder: both queues' folders are
    # checked on the way (and this one's made if missing).
    for folder, create in ((theirs.messages_path, False), (theirs.envelopes_path, False),
                           (own.messages_path, True), (own.envelopes_path, True),
                           (own.incoming_path, True)):
        os.close(open_folder(base, folder, create=create))
    linked, whole = [], []
    for queue_id in ids:
        if os.path.lexists(own.envelopes_path / f"{queue_id}.json"):
            done.left.append((queue_id, "this queue has a message with that id"))
            continue
        if not os.path.lexists(theirs.envelopes_path / f"{queue_id}.json"):
            if os.path.lexists(own.messages_path / queue_id):
                done.left.append((queue_id, "this queue has a message with that id"))
                continue
            try:
                theirs.load(queue_id)
            except CorruptEntry as e:
                done.left.append((queue_id, f"{e.problem} (set aside when its node starts)"))
                continue
            except QueueError:
                continue  # a file its node's start-up removes, or gone meanwhile
            try:
                os.rename(theirs.messages_path / queue_id, own.messages_path / queue_id)
            except FileNotFoundError:
                done.left.append((queue_id, "its message file vanished meanwhile"))
                continue
            whole.append(queue_id)
            continue
        try:
            # A file still reading as a whole entry beside its envelope
            # (a crash before the save marked it) must not count once linked.
            mark_stale(theirs.folder_fd(theirs.messages_path), queue_id)
        except FileNotFoundError:
            pass  # said below
        try:
            os.link(theirs.messages_path / queue_id, own.messages_path / queue_id,
                    follow_symlinks=False)
        except FileExistsError:
            pass  # a link from an adoption that crashed here: the same file
        except FileNotFoundError:
            done.left.append((queue_id, "its message file is missing (set aside when its node "
                                        "starts)"))
            continue
        linked.append(queue_id)
    fsync_directory(own.messages_path)
    if whole:
        fsync_directory(theirs.messages_path)
        done.moved.extend(whole)
    for queue_id in linked:
        try:
            os.rename(theirs.envelopes_path / f"{queue_id}.json",
                      own.envelopes_path / f"{queue_id}.json")
        except FileNotFoundError:
            done.left.append((queue_id, "its envelope vanished meanwhile"))
            continue
        done.moved.append(queue_id)
    fsync_directory(own.envelopes_path)
    fsync_directory(theirs.envelopes_path)
    for queue_id in done.moved:
        own.announce(queue_id)
    for queue_id in done.moved:
        try:
            os.unlink(theirs.messages_path / queue_id)
        except FileNotFoundError:
            pass
    return done


__all__ = ["AdoptionRefused", "Adopted", "adopt_queue"]
