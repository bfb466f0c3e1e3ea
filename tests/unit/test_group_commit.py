"""
Group commit: batches, ordering of the two phases, failures kept apart.
"""

from __future__ import annotations

import threading

from mailserver.group_commit import GroupCommitter


class ThreadReactor:
    """
    Just enough reactor: results are handed back from the committer thread.
    """

    def __init__(self):
        self.results = []
        self.done = threading.Semaphore(0)

    def callFromThread(self, f, *args):
        f(*args)

    def addSystemEventTrigger(self, *args):
        pass


def submit_all(committer, jobs):
    reactor = committer._reactor
    for prepare, publish in jobs:
        d = committer.submit(prepare, publish)
        d.addBoth(lambda result: (reactor.results.append(result), reactor.done.release()))
    for _ in jobs:
        assert reactor.done.acquire(timeout=10)


def test_every_message_is_prepared_synced_published_synced(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)
    events = []
    lock = threading.Lock()

    def record(event):
        with lock:
            events.append(event)

    committer._syncfs = lambda fd: record("sync")
    running, gate = threading.Event(), threading.Event()

    def first_prepare():
        running.set()
        gate.wait(5)  # hold the writer while the others queue up
        record("prepare 0")
        return 0

    def publish(state):
        record(f"publish {state}")
        return state

    def collect(result):
        record(f"answer {result}")
        reactor.results.append(result)
        reactor.done.release()

    committer.submit(first_prepare, publish).addBoth(collect)
    assert running.wait(5)
    for n in range(1, 4):
        committer.submit(lambda n=n: record(f"prepare {n}") or n, publish).addBoth(collect)
    gate.set()
    for _ in range(4):
        assert reactor.done.acquire(timeout=10)
    committer.stop()
    assert sorted(reactor.results) == [0, 1, 2, 3]
    for n in range(4):
        # Each message: written, then a sync, then moved, then a sync, then
        # answered, whatever the other messages were doing meanwhile.
        prepared = events.index(f"prepare {n}")
        published = events.index(f"publish {n}")
        answered = events.index(f"answer {n}")
        assert "sync" in events[prepared:published]
        assert "sync" in events[published:answered]
    # The three that queued up while the first was written shared a cycle.
    assert committer.batches <= 3
    assert events.count("sync") == 2 * committer.batches


def test_writing_overlaps_the_previous_batch_sync(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)
    syncing, release = threading.Event(), threading.Event()
    prepared_during_sync = []

    def slow_sync(fd):
        syncing.set()
        release.wait(5)

    committer._syncfs = slow_sync
    done = []
    committer.submit(lambda: 0, lambda s: s).addBoth(done.append)
    assert syncing.wait(5)
    # While the first message's sync runs, the next one is already written.
    committer.submit(lambda: prepared_during_sync.append(True) or 1, lambda s: s).addBoth(done.append)
    deadline = threading.Event()
    for _ in range(100):
        if prepared_during_sync:
            break
        deadline.wait(0.05)
    assert prepared_during_sync == [True]
    release.set()
    committer.stop()
    assert sorted(done) == [0, 1]


def test_a_failing_message_fails_alone(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)

    def broken():
        raise OSError(28, "No space left on device")

    submit_all(committer, [(broken, lambda s: s), (lambda: "ok", lambda s: s)])
    committer.stop()
    failures = [r for r in reactor.results if not isinstance(r, str)]
    assert [r for r in reactor.results if isinstance(r, str)] == ["ok"]
    assert len(failures) == 1 and failures[0].check(OSError)


def test_a_failed_sync_fails_the_batch(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)

    def failing_sync(fd):
        raise OSError(5, "I/O error")

    committer._syncfs = failing_sync
    published = []
    submit_all(committer, [(lambda: 1, published.append)])
    committer.stop()
    assert published == []  # never made visible after a failed data sync
    assert reactor.results[0].check(OSError)


def test_the_real_syncfs_runs(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)
    target = tmp_path / "file"
    submit_all(committer, [(lambda: target.write_bytes(b"x"), lambda state: target.read_bytes())])
    committer.stop()
    assert reactor.results == [b"x"]


def test_a_failed_sync_abandons_what_was_prepared(tmp_path):
    reactor = ThreadReactor()
    committer = GroupCommitter(reactor, tmp_path)

    def failing_sync(fd):
        raise OSError(28, "No space left on device")

    committer._syncfs = failing_sync
    abandoned = []
    d = committer.submit(lambda: "written", lambda state: state, abandoned.append)
    d.addBoth(lambda result: (reactor.results.append(result), reactor.done.release()))
    assert reactor.done.acquire(timeout=10)
    committer.stop()
    assert abandoned == ["written"]  # the tmp/ file is removed, not left behind
    assert reactor.results[0].check(OSError)
