"""
A message just queued is sent the first time from the bytes the intake held,
without reading its file back; memory for it is bounded.
"""

from __future__ import annotations

from mailserver.config import Config
from mailserver.envelope import Envelope, Recipient
from mailserver.relay.queue import QueueStore
from mailserver.relay.recent_bodies import MAX_BODY, RecentBodies

HEADER = b"Return-Path: <s@example.org>\n"
ENVELOPE = Envelope(sender="s@example.org",
                    recipients=(Recipient(address="x@remote.test",
                                          destinations=("x@remote.test",)),))


def _queue(tmp_path, data: bytes) -> tuple[QueueStore, str]:
    store = QueueStore(Config(hostname="mx.test", data_dir=str(tmp_path / "data")).queue_path)
    spool = tmp_path / "spool"
    spool.write_bytes(data)
    prepared = store.prepare(ENVELOPE, ("x@remote.test",), spool, len(HEADER), data=data)
    return store, store.commit(prepared, spool)


def test_the_first_attempt_takes_the_body_from_memory_once(tmp_path):
    data = HEADER + b"Subject: hi\n\nbody\n"
    store, queue_id = _queue(tmp_path, data)
    assert store.take_recent_body(queue_id) == b"Subject: hi\n\nbody\n"
    assert store.take_recent_body(queue_id) is None  # later attempts read the file
    with store.open_body(store.load(queue_id)) as body:
        assert body.read() == b"Subject: hi\n\nbody\n"


def test_a_removed_message_leaves_no_body_and_a_large_one_is_not_kept(tmp_path):
    store, queue_id = _queue(tmp_path, HEADER + b"small\n")
    store.remove(queue_id)
    assert len(store.recent_bodies) == 0
    (tmp_path / "big").mkdir()
    store, queue_id = _queue(tmp_path / "big", HEADER + b"x" * (MAX_BODY + 1))
    assert store.take_recent_body(queue_id) is None


def test_memory_is_bounded_and_the_oldest_go_first():
    bodies = RecentBodies(max_body=10, max_total=25)
    for n in range(5):
        bodies.keep(f"Q{n}", b"0123456789")
    assert bodies.total <= 25 and len(bodies) == 2
    assert bodies.take("Q0") is None and bodies.take("Q4") == b"0123456789"
    bodies.keep("big", b"x" * 11)
    assert bodies.take("big") is None
    bodies.forget(["Q3", "unknown"])
    assert len(bodies) == 0 and bodies.total == 0
