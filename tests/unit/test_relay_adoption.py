"""
A stopped node's relay queue moved into this node's (issue 22):
C{mailserver queue adopt NODE}.
"""

from __future__ import annotations

import os

import pytest

from mailserver.cli import main
from mailserver.envelope import Envelope, Recipient
from mailserver.nodes import try_lock
from mailserver.relay.adoption import AdoptionRefused, adopt_queue
from mailserver.relay.queue import QueueStore

ENVELOPE = Envelope(
    sender="s@example.org",
    recipients=(Recipient(address="x@remote.test", destinations=("x@remote.test",)),),
)


def queue_of(data, node):
    return QueueStore(data / "nodes" / node / "queue")


def enqueue(tmp_path, store, n):
    ids = []
    for i in range(n):
        spool = tmp_path / f"spool{i}"
        spool.write_bytes(b"Return-Path: <s@example.org>\nSubject: %d\n\nbody\n" % i)
        ids.append(store.enqueue(ENVELOPE, ("x@remote.test",), spool, 29))
        spool.unlink()
    return ids


def test_a_stopped_nodes_queue_moves_whole_into_this_one(tmp_path):
    data = tmp_path / "data"
    theirs, own = queue_of(data, "b"), queue_of(data, "a")
    ids = enqueue(tmp_path, theirs, 3)
    done = adopt_queue(data, data / "nodes", own, "b")
    assert sorted(done.moved) == sorted(ids) and done.left == []
    assert own.ids() == sorted(ids)
    assert [own.load(i).sender for i in ids] == ["s@example.org"] * 3
    with own.open_body(own.load(ids[1])) as body:
        assert body.read() == b"Subject: 1\n\nbody\n"
    assert theirs.ids() == [] and os.listdir(theirs.messages_path) == []
    # The running server is told, and takes them in at its next scan.
    assert sorted(own.take_incoming()) == sorted(ids)
    # Nothing left to take the second time.
    assert adopt_queue(data, data / "nodes", own, "b").moved == []


def test_a_running_node_keeps_its_queue(tmp_path):
    data = tmp_path / "data"
    theirs, own = queue_of(data, "b"), queue_of(data, "a")
    ids = enqueue(tmp_path, theirs, 1)
    lock = try_lock(data, data / "nodes" / "b")  # as the running node b holds it
    try:
        with pytest.raises(AdoptionRefused, match="node 'b' is running"):
            adopt_queue(data, data / "nodes", own, "b")
    finally:
        lock.release()
    assert theirs.ids() == ids and own.ids() == []


@pytest.mark.parametrize("node, problem", [
    ("a", "is this node"), ("c", "no node 'c'"), ("../b", "is not a node name"),
    (".", "is not a node name"),
])
def test_what_cannot_be_adopted_is_refused(tmp_path, node, problem):
    data = tmp_path / "data"
    enqueue(tmp_path, queue_of(data, "b"), 1)
    own = queue_of(data, "a")
    enqueue(tmp_path, own, 1)
    with pytest.raises(AdoptionRefused, match=problem):
        adopt_queue(data, data / "nodes", own, node)


def test_an_adoption_cut_short_after_the_links_is_finished_by_the_next(tmp_path):
    """
    A crash after step 1 leaves the message linked into this queue without
    its envelope: the next adoption takes it all the same, once.
    """
    data = tmp_path / "data"
    theirs, own = queue_of(data, "b"), queue_of(data, "a")
    [queue_id] = enqueue(tmp_path, theirs, 1)
    own.messages_path.mkdir(parents=True, exist_ok=True)
    os.link(theirs.messages_path / queue_id, own.messages_path / queue_id)
    done = adopt_queue(data, data / "nodes", own, "b")
    assert done.moved == [queue_id] and own.ids() == [queue_id]
    assert own.load(queue_id).id == queue_id


def test_an_id_this_queue_has_is_left_where_it_is(tmp_path):
    data = tmp_path / "data"
    theirs, own = queue_of(data, "b"), queue_of(data, "a")
    [queue_id] = enqueue(tmp_path, theirs, 1)
    [mine] = enqueue(tmp_path, own, 1)
    os.rename(own.envelopes_path / f"{mine}.json", own.envelopes_path / f"{queue_id}.json")
    done = adopt_queue(data, data / "nodes", own, "b")
    assert done.moved == [] and done.left == [(queue_id, "this queue has a message with that id")]
    assert theirs.ids() == [queue_id]


def test_the_command_says_what_it_did(tmp_path, capsys):
    data = tmp_path / "data"
    config = tmp_path / "mailserver.toml"
    config.write_text(f'data_dir = "{data}"\nnode_name = "a"\n')
    ids = enqueue(tmp_path, queue_of(data, "b"), 2)
    assert main(["--config", str(config), "queue", "adopt", "b"]) == 0
    out = capsys.readouterr().out
    assert "adopted 2 message(s) from node 'b' into node 'a'" in out
    assert "taken up when this node's server starts" in out
    assert queue_of(data, "a").ids() == sorted(ids)
    assert main(["--config", str(config), "queue", "adopt", "../b"]) == 1
    assert capsys.readouterr().err.strip() == "mailserver: '../b' is not a node name"
