"""
Folders shared by the sessions of a process: one state per folder, jobs
one at a time, every watcher told of every change, and a change on disk
noticed through the watcher.
"""

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver.folders.store import MailStore
from mailserver.folders.tree import FolderError
from mailserver.folders.watch import NoWatcher, PollingWatcher


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class Threads:
    """
    Runs each blocking call when told, as a worker thread would later.
    """

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            defer.maybeDeferred(f, *args).chainDeferred(d)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], defer.Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def store(tmp_path):
    return MailStore(lambda address: tmp_path / address, tmp_path, inline, Clock(), NoWatcher(), "host")


def deliver(root, name):
    (root / "new" / name).write_bytes(b"Subject: x\n\nbody\n")


def test_one_folder_object_per_folder_and_watchers_hear_every_change(store, tmp_path):
    account = store.account("bob")
    result_of(account.prepare())
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    first = result_of(account.open("INBOX"))
    second = result_of(account.open("inbox"))
    assert first is second
    heard = []
    first.watch(heard.append)
    result_of(first.store([1], "+", ["\\Seen"], origin="me"))
    deliver(tmp_path / "bob", "2.M1P1Q1.h")
    result_of(second.refresh())
    assert [(c.added, c.removed, c.changed, c.origin) for c in heard] == [
        ((), (), (1,), "me"),
        ((2,), (), (), None),
    ]
    assert first.flags(1) == ["\\Seen"]
    assert list(first.uids) == [1, 2]


def test_store_answers_only_the_uids_that_changed(store, tmp_path):
    account = store.account("bob")
    result_of(account.prepare())
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    folder = result_of(account.open("INBOX"))
    assert result_of(folder.store([1, 7], "+", ["\\Seen"], None)) == [1]
    assert result_of(folder.store([1], "+", ["\\Seen"], None)) == []


def test_jobs_run_one_at_a_time_and_refreshes_are_merged(tmp_path):
    threads = Threads()
    store = MailStore(lambda address: tmp_path / address, tmp_path, threads, Clock(), NoWatcher(), "h")
    account = store.account("bob")
    account.prepare()
    threads.run_all()
    opening = account.open("INBOX")
    threads.run_all()
    folder = result_of(opening)
    first = folder.refresh()
    second = folder.refresh()
    third = folder.refresh()
    assert len(threads.calls) == 1  # the first runs; the other two wait as one
    threads.run_all()
    for d in (first, second, third):
        result_of(d)
    assert not threads.calls


def test_opening_a_missing_folder_says_nonexistent(store):
    result_of(store.account("bob").prepare())
    with pytest.raises(FolderError) as caught:
        result_of(store.account("bob").open("Nothing"))
    assert caught.value.code == "NONEXISTENT"


def test_a_bad_name_cannot_be_opened(store):
    with pytest.raises(FolderError) as caught:
        result_of(store.account("bob").open("a.b"))
    assert caught.value.code == "CANNOT"


def test_copy_to_a_missing_folder_says_trycreate(store, tmp_path):
    account = store.account("bob")
    result_of(account.prepare())
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    folder = result_of(account.open("INBOX"))
    with pytest.raises(FolderError) as caught:
        result_of(folder.transfer([1], "Nowhere", False, None))
    assert caught.value.code == "TRYCREATE"


def test_move_tells_both_folders_watchers(store, tmp_path):
    account = store.account("bob")
    result_of(account.prepare())
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    inbox = result_of(account.open("INBOX"))
    trash = result_of(account.open("Trash"))
    heard_inbox, heard_trash = [], []
    inbox.watch(heard_inbox.append)
    trash.watch(heard_trash.append)
    validity, pairs = result_of(inbox.transfer([1], "Trash", True, "me"))
    assert validity == trash.uidvalidity and pairs == [(1, 1)]
    assert heard_inbox[0].removed == (1,)
    store.clock.advance(1)  # the target catches up with what the job did
    assert heard_trash[0].added == (1,)
    assert list(trash.uids) == [1]


def test_a_change_on_disk_reaches_a_watcher_through_the_watcher(tmp_path):
    clock = Clock()
    watcher = PollingWatcher(clock, interval=0.5)
    store = MailStore(lambda address: tmp_path / address, tmp_path, inline, clock, watcher, "h")
    account = store.account("bob")
    result_of(account.prepare())
    folder = result_of(account.open("INBOX"))
    heard = []
    folder.watch(heard.append)
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    clock.advance(0.5)
    clock.advance(0.1)
    assert [c.added for c in heard] == [(1,)]
    folder.unwatch(heard.append)
    deliver(tmp_path / "bob", "2.M1P1Q1.h")
    clock.advance(5)
    assert len(heard) == 1


def test_released_folders_are_kept_for_the_next_session(store, tmp_path, monkeypatch):
    account = store.account("bob")
    result_of(account.prepare())
    folder = result_of(account.open("INBOX"))
    folder.release()
    assert result_of(account.open("INBOX")) is folder


def test_inotify_watcher_names_the_files(tmp_path):
    from twisted.internet.testing import MemoryReactor

    from mailserver.folders.watch import APPEARED, GONE, InotifyWatcher

    try:
        watcher = InotifyWatcher(MemoryReactor())
    except OSError as e:  # pragma: no cover - not Linux
        pytest.skip(f"no inotify here: {e}")
    (tmp_path / "new").mkdir()
    (tmp_path / "cur").mkdir()
    heard = []
    watcher.watch(str(tmp_path), lambda sub, name, mask: heard.append((sub, name, mask)))
    (tmp_path / "new" / "x").write_bytes(b"")
    os.rename(tmp_path / "new" / "x", tmp_path / "cur" / "x:2,S")
    watcher.doRead()
    watcher.ignore(str(tmp_path))
    watcher.stop()
    assert [(sub, name, bool(mask & APPEARED), bool(mask & GONE)) for sub, name, mask in heard] == [
        ("new", b"x", True, False), ("new", b"x", False, True), ("cur", b"x:2,S", True, False),
    ]


def test_a_folder_looks_again_only_for_changes_it_did_not_make(tmp_path):
    clock = Clock()
    watcher = NoWatcher()
    threads = Threads()
    store = MailStore(lambda address: tmp_path / address, tmp_path, threads, clock, watcher, "h")
    account = store.account("bob")
    account.prepare()
    threads.run_all()
    deliver(tmp_path / "bob", "1.M1P1Q1.h")
    opening = account.open("INBOX")
    threads.run_all()
    folder = result_of(opening)
    folder.watch(lambda change: None)
    changed = watcher.watched[folder.path]
    storing = folder.store([1], "+", ["\\Seen"], None)  # renamed here, inline
    result_of(storing)
    # The rename's own two events: nothing to look at.
    changed("new", b"1.M1P1Q1.h", 0x40)
    changed("cur", b"1.M1P1Q1.h:2,S", 0x80)
    clock.advance(1)
    assert threads.calls == []
    # Another program's delivery: look again.
    changed("new", b"2.M1P1Q1.h", 0x100)
    clock.advance(1)
    assert [f.__name__ for f, _, _ in threads.calls] == ["refresh"]
