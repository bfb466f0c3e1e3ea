"""
The queue's whole entries: a message for remote recipients only, from
memory, queued as one file holding its envelope's line and the message
(issue 22: one new file a queued message instead of two).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest

from mailserver.envelope import Envelope, Recipient
from mailserver.relay import queue as queue_module
from mailserver.relay.adoption import adopt_queue
from mailserver.relay.index import build as build_index
from mailserver.relay.queue import CorruptEntry, QueueError, QueueStore
from mailserver.relay.whole_entry import STALE, WHOLE

DATA = b"Return-Path: <s@example.org>\nSubject: hi\n\nbody\n"
OFFSET = len(b"Return-Path: <s@example.org>\n")
ENVELOPE = Envelope(
    id="1K1ZZ0000000001A",
    sender="s@example.org",
    recipients=(
        Recipient(address="x@remote.test", destinations=("x@remote.test",)),
        Recipient(address="y@other.test", destinations=("y@other.test",)),
    ),
)


@pytest.fixture
def store(tmp_path):
    return QueueStore(tmp_path / "queue", clock=lambda: 1000.0)


def whole(store: QueueStore, envelope: Envelope = ENVELOPE) -> str:
    prepared = store.prepare_whole(envelope, ("x@remote.test", "y@other.test"), DATA, OFFSET)
    return store.commit(prepared, None)


def test_a_whole_entry_is_one_file_committed_by_its_rename(store):
    seen = []
    store.on_enqueued = seen.append
    prepared = store.prepare_whole(ENVELOPE, ("x@remote.test", "y@other.test"), DATA, OFFSET)
    # Before the commit: a file in tmp/ only, not queued.
    assert os.listdir(store.messages_path) == [] and store.ids() == []
    with pytest.raises(QueueError):
        store.load(ENVELOPE.id)
    queue_id = store.commit(prepared, None)
    assert queue_id == ENVELOPE.id
    assert os.listdir(store.tmp_path) == [] and os.listdir(store.envelopes_path) == []
    assert os.listdir(store.messages_path) == [queue_id]
    raw = (store.messages_path / queue_id).read_bytes()
    line, _, rest = raw.partition(b"\n")
    assert line.startswith(WHOLE) and rest == DATA
    assert json.loads(line[len(WHOLE):])["recipients"][1]["address"] == "y@other.test"
    message = store.load(queue_id)
    assert seen == [message] and store.ids() == [queue_id]
    assert message.data_offset == len(line) + 1 and message.size == len(DATA) - OFFSET
    assert [r.address for r in message.recipients] == ["x@remote.test", "y@other.test"]
    with store.open_body(message) as body:
        assert body.read() == b"Subject: hi\n\nbody\n"
    assert store.take_recent_body(queue_id) == b"Subject: hi\n\nbody\n"


def test_its_first_change_of_state_gets_an_envelope_and_marks_the_file_stale(store):
    queue_id = whole(store)
    message = store.load(queue_id)
    deferred = replace(message, attempts=1, last_error="451 later")
    store.save(deferred)
    assert (store.messages_path / queue_id).read_bytes().startswith(STALE)
    again = store.load(queue_id)
    assert again == deferred and again.data_offset == message.data_offset
    with store.open_body(again) as body:
        assert body.read() == b"Subject: hi\n\nbody\n"
    store.save(replace(again, attempts=2))  # already stale: stays so
    assert store.load(queue_id).attempts == 2
    assert store.ids() == [queue_id]
    store.remove(queue_id)
    assert store.ids() == [] and os.listdir(store.messages_path) == []
    assert os.listdir(store.envelopes_path) == []


def test_its_removal_is_synced(store, monkeypatch):
    queue_id = whole(store)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    assert store.remove_all([queue_id]) == {}
    assert synced == [store.folder_fd(store.messages_path)]
    assert os.listdir(store.messages_path) == []


def test_start_up_keeps_whole_entries_and_removes_what_no_longer_commits_itself(store):
    keep = whole(store)
    # A stale file whose envelope was removed (a removal cut short) and a
    # link that never got its envelope: neither is queued.
    stale = whole(store, replace(ENVELOPE, id="1K1ZZ0000000002A"))
    store.save(replace(store.load(stale), attempts=1))
    os.unlink(store.envelopes_path / f"{stale}.json")
    orphan = store.messages_path / "1K1ZZ0000000003A"
    orphan.write_bytes(DATA)
    assert store.load(keep).id == keep
    for name in (stale, orphan.name):
        with pytest.raises(QueueError):
            store.load(name)
    index, corrupt = build_index(store)
    assert [e.id for e in index.entries()] == [keep] and corrupt == []
    old = time.time() - 7200
    for name in os.listdir(store.messages_path):
        os.utime(store.messages_path / name, (old, old))
    assert sorted(store.remove_orphans()) == sorted([stale, orphan.name])
    assert os.listdir(store.messages_path) == [keep]


@pytest.mark.parametrize("damage, problem", [
    (lambda raw: raw[:20], "cut short"),
    (lambda raw: WHOLE + b"{not json\n" + DATA, "not valid JSON"),
    (lambda raw: raw.replace(b"1K1ZZ0000000001A", b"1K1ZZ0000000009A", 1), "holds the id"),
    (lambda raw: raw.partition(b"\n")[0] + b"\nshort", "shorter than"),
])
def test_a_damaged_whole_entry_is_corrupt_and_set_aside(store, damage, problem):
    queue_id = whole(store)
    path = store.messages_path / queue_id
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptEntry) as caught:
        store.load(queue_id)
    assert problem in caught.value.problem and caught.value.path == path
    store.set_aside(queue_id, caught.value.problem)
    assert store.ids() == []
    assert sorted(os.listdir(store.corrupt_path)) == [queue_id, f"{queue_id}.problem"]


def test_adoption_moves_a_whole_entry_in_one_rename(tmp_path):
    data = tmp_path / "data"
    theirs = QueueStore(data / "nodes" / "b" / "queue")
    own = QueueStore(data / "nodes" / "a" / "queue")
    queue_id = whole(theirs)
    done = adopt_queue(data, data / "nodes", own, "b")
    assert done.moved == [queue_id] and done.left == []
    assert theirs.ids() == [] and own.ids() == [queue_id]
    assert os.listdir(own.envelopes_path) == []
    with own.open_body(own.load(queue_id)) as body:
        assert body.read() == b"Subject: hi\n\nbody\n"
    assert own.take_incoming() == [queue_id]
    # The same id in both queues is left where it is.
    again = whole(theirs)
    assert adopt_queue(data, data / "nodes", own, "b").left == [
        (again, "this queue has a message with that id")]
    assert theirs.ids() == [again]


def test_a_failed_commit_leaves_nothing(store, monkeypatch):
    prepared = store.prepare_whole(ENVELOPE, ("x@remote.test",), DATA, OFFSET)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue_module.os, "rename", refuse)
    with pytest.raises(OSError):
        store.commit(prepared, None)
    monkeypatch.undo()
    assert os.listdir(store.tmp_path) == [] and store.ids() == []


def test_a_file_left_unmarked_by_a_crash_during_a_save_is_marked_when_read(store):
    """
    The save's envelope reached the disk, its stale mark did not: the
    envelope counts, and the next read marks the file, so no removal
    (envelope first) can leave it to come back with its first state.
    """
    queue_id = whole(store)
    store.save(replace(store.load(queue_id), attempts=1))
    path = store.messages_path / queue_id
    path.write_bytes(WHOLE + path.read_bytes()[len(STALE):])  # as before the mark
    assert store.load(queue_id).attempts == 1
    assert path.read_bytes().startswith(STALE)
    os.unlink(store.envelopes_path / f"{queue_id}.json")  # a removal cut short
    with pytest.raises(QueueError):
        store.load(queue_id)


def test_the_envelope_of_a_whole_entry_has_a_version_older_releases_refuse(store, tmp_path):
    queue_id = whole(store)
    store.save(replace(store.load(queue_id), attempts=1))
    saved = json.loads((store.envelopes_path / f"{queue_id}.json").read_text())
    assert saved["version"] == 2 and saved["data_offset"] > 0
    line = (store.messages_path / queue_id).read_bytes().split(b"\n")[0]
    assert json.loads(line[len(STALE):])["version"] == 1  # the line itself: no offset in it
    assert store.load(queue_id).attempts == 1


def test_a_read_racing_the_first_save_finds_the_envelope(store, monkeypatch):
    queue_id = whole(store)
    message = store.load(queue_id)
    real_open_path = queue_module.open_path
    raced = []

    def save_in_between(path, *args, **kwargs):
        if path.name.endswith(".json") and not raced:
            raced.append(path)
            store.save(replace(message, attempts=1))  # after this read found no envelope
            raise FileNotFoundError(path)
        return real_open_path(path, *args, **kwargs)

    monkeypatch.setattr(queue_module, "open_path", save_in_between)
    assert store.load(queue_id).attempts == 1 and raced


def test_an_unreadable_file_is_kept_at_start(store, monkeypatch):
    from mailserver.relay import whole_entry

    orphan = store.messages_path / "1K1ZZ0000000004A"
    store.ensure()
    orphan.write_bytes(DATA)
    old = time.time() - 7200
    os.utime(orphan, (old, old))

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(whole_entry, "open_path", refuse)
    assert store.remove_orphans() == [] and orphan.exists()
    monkeypatch.undo()
    assert store.remove_orphans() == [orphan.name]


def test_set_aside_says_where_a_whole_entry_went(store):
    queue_id = whole(store)
    assert store.set_aside(queue_id, "test") == store.corrupt_path / queue_id
