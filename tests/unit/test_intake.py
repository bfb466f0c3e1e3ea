"""
The intake: one durable copy, routed to Maildirs (and the relay queue).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailserver.config import Config
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake, NoRelayQueue
from mailserver.maildir import Mailbox
from mailserver.memory_budget import MemoryBudget
from mailserver.testing import InlineCommitter, InlineReactor


@pytest.fixture
def accounts(tmp_path):
    config = Config(hostname="mx.test", data_dir=str(tmp_path / "data"), local_domains=("example.org",))
    accounts = accounts_for(config)
    accounts.add_user("a@example.org", "x")
    accounts.add_user("b@example.org", "x")
    return accounts


def make_intake(accounts, **options) -> Intake:
    # The fixture's users file is in its data folder.
    return Intake(accounts=accounts, reactor=InlineReactor(), data_path=accounts.users_path.parent,
                  hostname="mx.test", min_free_space=0, committer=InlineCommitter(), **options)


def envelope(*destinations: str) -> Envelope:
    return Envelope(
        sender="s@remote.test",
        recipients=tuple(Recipient(address=d, destinations=(d,)) for d in destinations),
    )


def run(intake, env, pieces):
    receiver = intake.begin(env)
    for piece in pieces:
        receiver.write(piece)
    results = []
    receiver.finish().addBoth(results.append)
    return results[0]


def test_local_delivery_to_several_mailboxes(accounts):
    delivered = []
    intake = make_intake(accounts, on_delivered=delivered.append)
    pieces = [b"Subject: x\r", b"\n\r\nline\r\n", b"\r\n", b"end\r\n"]
    queue_id = run(intake, envelope("a@example.org", "b@example.org"), pieces)
    assert isinstance(queue_id, str)
    for user in ("a", "b"):
        (info,) = Mailbox(accounts.mailbox_path(f"{user}@example.org"), accounts.users_path.parent).messages()
        data = Path(info.path).read_bytes()
        assert data == b"Return-Path: <s@remote.test>\nSubject: x\n\nline\n\nend\n"
        assert info.size == len(data.replace(b"\n", b"\r\n"))
    assert [(d.recipient, d.status, d.queue_id) for d in delivered] == [
        ("a@example.org", "delivered", queue_id),
        ("b@example.org", "delivered", queue_id),
    ]
    assert list((intake.spool_path / "tmp").iterdir()) == []


def test_remote_recipient_without_a_queue_fails_and_stores_nothing(accounts):
    intake = make_intake(accounts)
    failure = run(intake, envelope("a@example.org", "x@remote.test"), [b"Subject: x\r\n\r\nhi\r\n"])
    assert failure.check(NoRelayQueue)
    assert Mailbox(accounts.mailbox_path("a@example.org"), accounts.users_path.parent).messages() == []
    assert list((intake.spool_path / "tmp").iterdir()) == []


def test_remote_recipients_go_to_the_queue_without_return_path(accounts):
    queued = []

    class Queue:
        def prepare(self, env, recipients, spool, body_offset, data=None):
            # The bytes in memory are the file's (a small body is kept for
            # the relay's first attempt).
            assert data == spool.read_bytes()
            return recipients, body_offset

        def commit(self, prepared, spool):
            recipients, body_offset = prepared
            queued.append((recipients, spool.read_bytes()[body_offset:]))
            return "R1"

        def abandon(self, prepared):
            raise AssertionError("nothing failed")

    intake = make_intake(accounts, queue=Queue())
    run(intake, envelope("a@example.org", "x@remote.test"), [b"Subject: x\r\n\r\nhi\r\n"])
    assert queued == [(("x@remote.test",), b"Subject: x\n\nhi\n")]
    assert len(Mailbox(accounts.mailbox_path("a@example.org"), accounts.users_path.parent).messages()) == 1


def test_abort_leaves_nothing(accounts):
    intake = make_intake(accounts)
    receiver = intake.begin(envelope("a@example.org"))
    receiver.write(b"partial")
    receiver.abort()
    assert list((intake.spool_path / "tmp").iterdir()) == []


def test_a_large_message_is_spooled_not_held_in_memory(accounts, monkeypatch):
    import mailserver.intake

    monkeypatch.setattr(mailserver.intake, "SPILL_SIZE", 100)
    intake = make_intake(accounts)
    receiver = intake.begin(envelope("a@example.org", "b@example.org"))
    receiver.write(b"Subject: big\r\n\r\n")
    for n in range(50):
        receiver.write(b"line %d\r\n" % n)
    assert receiver._pieces == [] and len(list((intake.spool_path / "tmp").iterdir())) == 1
    results = []
    receiver.finish().addBoth(results.append)
    assert isinstance(results[0], str)
    expected = b"Return-Path: <s@remote.test>\nSubject: big\n\n" + b"".join(
        b"line %d\n" % n for n in range(50)
    )
    for user in ("a", "b"):
        (info,) = Mailbox(accounts.mailbox_path(f"{user}@example.org"), accounts.users_path.parent).messages()
        assert Path(info.path).read_bytes() == expected
    assert list((intake.spool_path / "tmp").iterdir()) == []


def test_messages_spill_to_disk_once_all_sessions_hold_the_memory_budget(accounts):
    budget = MemoryBudget(1000)
    intake = make_intake(accounts, budget=budget)
    first = intake.begin(envelope("a@example.org"))
    first.write(b"Subject: one\r\n\r\n" + b"x" * 900 + b"\r\n")
    assert first._spool is None  # alone under the budget: in memory
    second = intake.begin(envelope("b@example.org"))
    second.write(b"Subject: two\r\n\r\n" + b"y" * 200 + b"\r\n")
    assert second._spool is not None  # together over it: on disk
    for receiver in (first, second):
        results = []
        receiver.finish().addBoth(results.append)
        assert isinstance(results[0], str)
    assert budget.held == 0
    (info,) = Mailbox(accounts.mailbox_path("b@example.org"), accounts.users_path.parent).messages()
    assert Path(info.path).read_bytes().endswith(b"y" * 200 + b"\n")
    aborted = intake.begin(envelope("a@example.org"))
    aborted.write(b"partial")
    aborted.abort()
    assert budget.held == 0


def test_the_return_path_carries_no_control_or_format_characters(accounts):
    intake = make_intake(accounts)
    env = Envelope(sender="s\u0085\u2028\u202e@remote.test",
                   recipients=(Recipient("a@example.org", ("a@example.org",)),))
    run(intake, env, [b"Subject: x\r\n\r\nbody\r\n"])
    (info,) = Mailbox(accounts.mailbox_path("a@example.org"), accounts.users_path.parent).messages()
    data = Path(info.path).read_bytes()
    assert data.startswith(b"Return-Path: <s???@remote.test>\nSubject: x\n")


def test_delivery_through_a_linked_new_fails_and_writes_nothing_there(accounts, tmp_path):
    from mailserver.safe_fs import SymlinkRefused

    outside = tmp_path / "outside"
    outside.mkdir()
    intake = make_intake(accounts)
    maildir = accounts.mailbox_path("a@example.org")
    for sub in ("tmp", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new").symlink_to(outside)
    failure = run(intake, envelope("a@example.org"), [b"Subject: x\r\n\r\nbody\r\n"])
    assert failure.check(SymlinkRefused)
    assert os.listdir(outside) == [] and os.listdir(maildir / "tmp") == []


def test_relayed_mail_is_queued_by_the_groups_sync_without_its_own(accounts, monkeypatch):
    """
    Issue 22: the queue's envelope and message link are made durable by
    group commit's two syncs of the file system, like Maildir deliveries,
    not by fsyncs of their own one message after another.
    """
    from mailserver.relay import queue as queue_module
    from mailserver.relay.queue import QueueStore

    store = QueueStore(accounts.users_path.parent / "nodes" / "mx" / "queue")
    intake = make_intake(accounts, queue=store)
    first = run(intake, envelope("a@example.org", "x@remote.test"), [b"Subject: 0\r\n\r\n"])
    assert isinstance(first, str)  # the folders are made (and synced) once, here
    before = set(store.ids())
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(queue_module, "fsync_directory", lambda path: synced.append(path))
    run(intake, envelope("a@example.org", "x@remote.test"), [b"Subject: x\r\n\r\nhi\r\n"])
    assert synced == []
    [queue_id] = set(store.ids()) - before
    message = store.load(queue_id)
    assert [r.address for r in message.recipients] == ["x@remote.test"]
    with store.open_body(message) as body:
        assert body.read() == b"Subject: x\n\nhi\n"
    assert os.listdir(store.tmp_path) == []


def test_a_failed_sync_leaves_nothing_queued(accounts):
    from twisted.internet import defer

    from mailserver.relay.queue import QueueStore

    class FailingSync:
        def submit(self, prepare, publish, abandon=None):
            abandon(prepare())
            return defer.fail(OSError(5, "Input/output error"))

    store = QueueStore(accounts.users_path.parent / "nodes" / "mx" / "queue")
    intake = Intake(accounts=accounts, reactor=InlineReactor(),
                    data_path=accounts.users_path.parent, hostname="mx.test", min_free_space=0,
                    committer=FailingSync(), queue=store)
    failure = run(intake, envelope("a@example.org", "x@remote.test"), [b"Subject: x\r\n\r\nhi\r\n"])
    assert failure.check(OSError)
    assert store.ids() == [] and os.listdir(store.tmp_path) == []
    assert os.listdir(store.messages_path) == []
    assert Mailbox(accounts.mailbox_path("a@example.org"), accounts.users_path.parent).messages() == []


def test_a_message_for_remote_recipients_only_is_one_file_of_the_queue(accounts):
    """
    No spool file to link into the queue and remove afterwards, and no
    envelope file: the one file written is the queue's whole entry (its
    envelope's line, then the message), and nothing is left when its sync
    fails.
    """
    from dataclasses import replace

    from twisted.internet import defer

    from mailserver.relay.queue import QueueStore

    store = QueueStore(accounts.users_path.parent / "nodes" / "mx" / "queue")
    intake = make_intake(accounts, queue=store)
    env = replace(envelope("x@remote.test", "y@remote.test"), id="1K1YH307T0J00ECY")
    assert run(intake, env, [b"Subject: x\r\n\r\nhi\r\n"]) == "1K1YH307T0J00ECY"
    assert store.ids() == ["1K1YH307T0J00ECY"]
    assert os.stat(store.messages_path / "1K1YH307T0J00ECY").st_nlink == 1  # no second name
    assert os.listdir(store.envelopes_path) == []
    first_line = (store.messages_path / "1K1YH307T0J00ECY").read_bytes().split(b"\n")[0]
    assert first_line.startswith(b'MAILSERVER-QUEUED {"arrival":')
    assert os.listdir(intake.spool_path / "tmp") == []
    with store.open_body(store.load("1K1YH307T0J00ECY")) as body:
        assert body.read() == b"Subject: x\n\nhi\n"
    assert store.take_recent_body("1K1YH307T0J00ECY") == b"Subject: x\n\nhi\n"

    class FailingSync:
        def submit(self, prepare, publish, abandon=None):
            abandon(prepare())
            return defer.fail(OSError(5, "Input/output error"))

    intake = Intake(accounts=accounts, reactor=InlineReactor(),
                    data_path=accounts.users_path.parent, hostname="mx.test", min_free_space=0,
                    committer=FailingSync(), queue=store)
    failure = run(intake, replace(env, id="1K1YH307T0J00ECZ"), [b"Subject: y\r\n\r\n"])
    assert failure.check(OSError)
    assert store.ids() == ["1K1YH307T0J00ECY"]
    assert os.listdir(store.messages_path) == ["1K1YH307T0J00ECY"]
    assert os.listdir(store.tmp_path) == []
