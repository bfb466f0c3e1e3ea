"""
The relay runner with a recording courier and a controlled clock: retries,
bounces, NOTIFY, expiry, restart, CLI requests and connection limits.
"""

from __future__ import annotations

import os

import email
import email.policy

from twisted.internet import defer

from mailserver.config import Config, HostPort, Relay
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.maildir import Mailbox
from mailserver.relay import QueueStore, RelayRunner
from mailserver.wire.reply import Reply
from mailserver.relay.delivery import Outcome
from mailserver.testing import InlineCommitter, InlineReactor


class Courier:
    """
    Answers every recipient with the next scripted reply code (the last one
    repeats), or holds the attempt when told to.
    """

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = []
        self.hold = False
        self.held = []

    def deliver(self, message, recipients):
        self.calls.append((message.id, tuple(r.address for r in recipients)))
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, recipients))
            return d
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        return defer.succeed(self.outcomes(recipients, code))

    @staticmethod
    def outcomes(recipients, code):
        """
        C{code} 441 stands for a 451 4.4.1: no server could be reached.
        """
        text = {250: "2.0.0 ok", 451: "4.3.0 try later", 550: "5.1.1 no such user",
                441: "4.4.1 cannot connect to mx.remote.test"}[code]
        reply = Reply.received(451 if code == 441 else code, (text,))
        return {r.address: Outcome(reply, "mx.remote.test") for r in recipients}


class World:
    def __init__(self, tmp_path, courier, **relay) -> None:
        self.config = Config(
            hostname="mx.test",
            data_dir=str(tmp_path / "data"),
            local_domains=("example.org",),
            relay=Relay(**relay),
        )
        self.reactor = InlineReactor()
        self.accounts = accounts_for(self.config)
        if "s@example.org" not in self.accounts.users():
            self.accounts.add_user("s@example.org", "pw")
        self.queue = QueueStore(self.config.queue_path, clock=self.reactor.seconds)
        self.intake = Intake(
            accounts=self.accounts, reactor=self.reactor, data_path=self.config.data_path,
            hostname=self.config.hostname, min_free_space=0, queue=self.queue,
            committer=InlineCommitter(),
        )
        self.courier = courier
        self.runner = RelayRunner(
            relay=self.config.relay, hostname=self.config.hostname,
            mta_sts_path=self.config.mta_sts_path, queue=self.queue,
            intake=self.intake, reactor=self.reactor,
            courier=courier, accounts=self.accounts, jitter=lambda d: d,
        )

    def start(self):
        self.runner.startService()
        self.reactor.advance(0)

    def send(self, sender="s@example.org", to=("r@remote.test",), notify=(), ret=None,
             data=b"Subject: hello\r\n\r\nbody\r\n"):
        receiver = self.intake.begin(Envelope(
            sender=sender,
            recipients=tuple(Recipient(address=a, destinations=(a,), notify=notify) for a in to),
            ret=ret,
        ))
        receiver.write(data)
        results = []
        receiver.finish().addBoth(results.append)
        self.reactor.advance(0)
        return results[0]

    def bounces(self):
        box = Mailbox(self.accounts.mailbox_path("s@example.org"), self.config.data_path)
        if not (box.path / "new").exists():
            return []
        out = []
        for info in box.messages():
            with box.open(info) as f:
                out.append(email.message_from_bytes(f.read(), policy=email.policy.default))
        return out


def test_success_removes_the_message(tmp_path):
    w = World(tmp_path, Courier(250))
    w.start()
    w.send()
    assert w.courier.calls and w.courier.calls[0][1] == ("r@remote.test",)
    assert w.queue.ids() == []
    assert w.bounces() == []


def test_a_message_done_with_is_removed_without_saving_its_last_state(tmp_path, monkeypatch):
    """
    Issue 22: the envelope of a message whose recipients all got their
    250, with no report owed, is not written once more just before it is
    removed (two fsyncs while the attempt holds its destination's slot).
    """
    w = World(tmp_path, Courier(250))
    saved = []
    original = w.queue.save
    monkeypatch.setattr(w.queue, "save", lambda message: (saved.append(message.id),
                                                          original(message)))
    w.start()
    w.send()
    assert w.courier.calls and w.queue.ids() == []
    assert saved == []
    # A message with a report owed (NOTIFY=SUCCESS) is saved as before.
    w.send(notify=("SUCCESS",))
    assert len(saved) >= 1 and w.queue.ids() == []


def test_a_fresh_message_is_not_read_back_for_its_first_attempt(tmp_path, monkeypatch):
    """
    Issue 22: the runner has the message as the intake committed it; its
    first attempt reads nothing back from the queue folder; a retry does.
    """
    w = World(tmp_path, Courier(451, 250))
    loaded = []
    original = w.queue.load
    monkeypatch.setattr(w.queue, "load", lambda queue_id: (loaded.append(queue_id),
                                                            original(queue_id))[1])
    w.start()
    w.send()
    assert len(w.courier.calls) == 1 and loaded == []
    [queue_id] = w.queue.ids()
    w.reactor.advance(w.runner.policy.delays[0] + 1)
    assert len(w.courier.calls) == 2 and loaded == [queue_id]
    assert w.queue.ids() == []


def test_removals_that_finish_together_share_one_thread_job_and_fsync(tmp_path, monkeypatch):
    """
    Issue 22: while one removal runs, the messages finished meanwhile wait
    and go together, with one fsync of the envelope folder; a problem with
    one fails only its own removal.
    """
    from twisted.internet import defer

    from mailserver.relay.removal import BatchedRemoval

    jobs = []

    def io(f, *args):
        d = defer.Deferred()
        jobs.append((f, args, d))
        return d

    synced = []
    w = World(tmp_path, Courier(451), scan_interval=1000)
    w.start()
    for _ in range(4):
        w.send()
    ids = w.queue.ids()
    removal = BatchedRemoval(w.queue.remove_all, io)
    outcomes = {}
    for queue_id in ids[:3]:
        removal.remove(queue_id).addBoth(lambda r, i=queue_id: outcomes.__setitem__(i, r))
    assert [args for _, args, _ in jobs] == [([ids[0]],)]
    # The first job runs; the next two went together once it was done.
    f, args, d = jobs.pop()
    d.callback(f(*args))
    assert outcomes == {ids[0]: None}
    assert [args for _, args, _ in jobs] == [(ids[1:3],)]
    synced.clear()
    f, args, d = jobs.pop()
    d.callback({ids[1]: OSError("disk on fire")})
    assert outcomes[ids[2]] is None and outcomes[ids[1]].check(OSError)
    # remove_all itself: every envelope, one fsync of their folder, then the
    # message files.
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    assert w.queue.remove_all(ids[2:]) == {}
    assert synced == [w.queue.folder_fd(w.queue.envelopes_path)]
    assert w.queue.ids() == [ids[1]]  # ids[0] by the first job; ids[1]'s was made to fail
    assert [p.name for p in w.queue.messages_path.iterdir()] == [ids[1]]


def test_scans_asked_for_while_one_runs_make_one_more(tmp_path):
    """
    Issue 22: each message a worker queues asks the primary for a scan; one
    runs at a time, and those asked for meanwhile make one more after it.
    """
    from twisted.internet import defer

    w = World(tmp_path, Courier(250), scan_interval=1000)
    w.start()
    jobs = []
    w.runner._io = lambda f, *args: jobs.append((f, args, defer.Deferred())) or jobs[-1][2]
    w.runner.scan()
    w.runner.scan()
    w.runner.scan()
    assert len(jobs) == 1
    f, args, d = jobs.pop()
    d.callback(f(*args))
    assert len(jobs) == 1  # the one more
    f, args, d = jobs.pop()
    d.callback(f(*args))
    assert jobs == []


def test_a_mark_in_incoming_is_taken_by_one_scan_only(tmp_path, monkeypatch):
    import os

    w = World(tmp_path, Courier(250))
    w.queue.ensure()
    w.queue.announce("1K1YH307T0J00ECY")
    w.queue.announce("1K1YH307T0J00ECZ")
    unlink = os.unlink

    def raced(path, *args, **kwargs):
        if str(path).endswith("ECZ"):
            unlink(path)  # another scan took it first
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", raced)
    assert w.queue.take_incoming() == ["1K1YH307T0J00ECY"]


def test_temporary_failure_is_retried_on_the_schedule(tmp_path):
    w = World(tmp_path, Courier(451, 451, 250))
    w.start()
    queue_id = w.send()
    assert len(w.courier.calls) == 1
    message = w.queue.load(w.queue.ids()[0])
    assert message.attempts == 1 and message.last_error == "451 4.3.0 try later"
    assert message.next_attempt == w.reactor.seconds() + 300
    w.reactor.advance(299)
    assert len(w.courier.calls) == 1
    w.reactor.advance(1)
    assert len(w.courier.calls) == 2
    w.reactor.advance(599)
    assert len(w.courier.calls) == 2
    w.reactor.advance(1)
    assert len(w.courier.calls) == 3
    assert w.queue.ids() == [] and w.bounces() == []
    assert queue_id


def test_permanent_failure_bounces_once_to_the_local_sender(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(to=("r@remote.test", "q@remote.test"))
    assert len(w.courier.calls) == 1  # one transaction per domain
    assert w.queue.ids() == []
    [report] = w.bounces()
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1].get_payload()
    finals = sorted(block["Final-Recipient"] for block in status[1:])
    assert finals == ["rfc822; q@remote.test", "rfc822; r@remote.test"]
    assert {block["Status"] for block in status[1:]} == {"5.1.1"}
    assert report.get_payload()[2].get_content_type() == "message/rfc822"


def test_ret_hdrs_returns_only_headers(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(ret="HDRS")
    [report] = w.bounces()
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_null_sender_is_never_bounced(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(sender="")
    assert w.queue.ids() == []
    assert w.bounces() == []


def test_notify_never_and_success(tmp_path):
    w = World(tmp_path, Courier(550))
    w.start()
    w.send(notify=("NEVER",))
    assert w.queue.ids() == [] and w.bounces() == []
    w.courier.codes = [250]
    w.send(notify=("SUCCESS",))
    [report] = w.bounces()
    status = report.get_payload()[1].get_payload()
    assert status[1]["Action"] == "relayed"


def test_expired_message_bounces_with_the_last_error(tmp_path):
    w = World(tmp_path, Courier(451), max_age=3600.0, retry_schedule=(600.0,))
    w.start()
    w.send()
    for _ in range(10):
        w.reactor.advance(600)
    assert w.queue.ids() == []
    [report] = w.bounces()
    block = report.get_payload()[1].get_payload()[1]
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert "try later" in block["Diagnostic-Code"]
    assert len(w.courier.calls) == 4  # at 0, 10m, 30m and the last at 1h


def test_delay_warning_once_for_notify_delay(tmp_path):
    w = World(tmp_path, Courier(451), delay_warning=900.0, retry_schedule=(600.0,))
    w.start()
    w.send(notify=("DELAY", "FAILURE"))
    w.reactor.advance(600)
    assert w.bounces() == []
    w.reactor.advance(1200)
    w.reactor.advance(2400)
    [report] = w.bounces()
    assert report.get_payload()[1].get_payload()[1]["Action"] == "delayed"


def test_restart_picks_up_the_queue(tmp_path):
    w = World(tmp_path, Courier(451))
    w.start()
    w.send()
    w.send()
    w.runner.stopService()
    assert len(w.queue.ids()) == 2
    w2 = World(tmp_path, Courier(250))
    w2.start()
    assert len(w2.courier.calls) == 0  # not yet due: 5 minutes after the first try
    w2.reactor.advance(300)
    assert len(w2.courier.calls) == 2
    assert w2.queue.ids() == []


def test_flush_and_cli_requests(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    w.send(to=("a@one.test",))
    w.send(to=("b@two.test",))
    assert len(w.courier.calls) == 2
    assert w.runner.flush("two.test") == 1
    w.reactor.advance(0)
    assert w.courier.calls[-1][1] == ("b@two.test",)
    one, two = sorted((w.queue.load(i) for i in w.queue.ids()),
                      key=lambda m: m.recipients[0].address)
    w.queue.request("delete", two.id)
    w.queue.request("bounce", one.id)
    w.reactor.advance(5)
    assert w.queue.ids() == []
    [report] = w.bounces()
    assert "a@one.test" in report.get_payload()[1].get_payload()[1]["Final-Recipient"]


def test_connection_limit_per_destination(tmp_path):
    courier = Courier(250)
    courier.hold = True
    w = World(tmp_path, courier, max_connections_per_destination=1, max_connections=2)
    w.start()
    w.send(to=("a@one.test",))
    w.send(to=("b@one.test",))
    w.send(to=("c@two.test",))
    w.send(to=("d@three.test",))
    assert [c[1] for c in courier.calls] == [("a@one.test",), ("c@two.test",)]
    d, recipients = courier.held.pop(0)
    d.callback(Courier.outcomes(recipients, 250))
    w.reactor.advance(0)
    assert [c[1] for c in courier.calls][2:] == [("b@one.test",)]
    d, recipients = courier.held.pop(0)
    d.callback(Courier.outcomes(recipients, 250))
    w.reactor.advance(0)
    assert [c[1] for c in courier.calls][3:] == [("d@three.test",)]


# Corrupt queue entries and failed attempts.

import pytest  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402

from mailserver.metrics import unregistered_metrics  # noqa: E402


@pytest.fixture
def logged():
    lines = []

    def observe(event):
        if event.get("log_namespace", "").startswith("mailserver.relay"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def corrupt_lines(lines):
    return [line for line in lines if "is corrupt" in line]


def test_corrupt_entry_at_start_is_set_aside_once_and_the_rest_delivered(tmp_path, logged):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    w.send()
    w.send()
    w.runner.stopService()
    good, bad = sorted(w.queue.ids())
    (w.queue.envelopes_path / f"{bad}.json").write_text('{"version": 1, "id": ')
    w2 = World(tmp_path, Courier(250), scan_interval=5)
    w2.runner._metrics = metrics = unregistered_metrics()
    w2.start()
    [line] = corrupt_lines(logged)
    assert f"file={w2.queue.envelopes_path / bad}.json, problem=not valid JSON" in line
    assert f"where={w2.queue.corrupt_path / bad}.json" in line
    assert metrics.relay_queue_corrupt_total.value() == 1
    assert w2.queue.ids() == [good]
    assert (w2.queue.corrupt_path / bad).exists()  # the message kept beside it
    w2.reactor.advance(300)
    assert [c[0] for c in w2.courier.calls] == [good]
    for _ in range(5):
        w2.reactor.advance(5)
    assert len(corrupt_lines(logged)) == 1 and w2.queue.ids() == []
    assert w2.bounces() == []


def test_entry_that_goes_bad_while_queued_is_set_aside_at_its_attempt(tmp_path, logged):
    w = World(tmp_path, Courier(451), scan_interval=1000)
    w.start()
    w.send()
    [queue_id] = w.queue.ids()
    (w.queue.messages_path / queue_id).unlink()
    w.reactor.advance(300)
    [line] = corrupt_lines(logged)
    assert "its message file is missing" in line
    assert len(w.courier.calls) == 1 and w.queue.ids() == []
    assert w.queue.corrupt_entries() == [(queue_id, "its message file is missing")]
    w.reactor.advance(3000)
    assert len(corrupt_lines(logged)) == 1 and len(w.courier.calls) == 1


def test_entry_that_cannot_be_moved_is_reported_once_and_ignored(tmp_path, logged):
    w = World(tmp_path, Courier(250), scan_interval=5)
    w.queue.ensure()
    (w.queue.envelopes_path / "BAD.json").write_text("nonsense")

    def cannot(queue_id, problem):
        raise PermissionError(13, "Permission denied")

    w.queue.set_aside = cannot
    w.start()
    for _ in range(5):
        w.reactor.advance(5)
    [line] = corrupt_lines(logged)
    assert "cannot be moved aside; ignoring it" in line and "error=Permission denied" in line
    assert w.courier.calls == []
    w.send()
    assert len(w.courier.calls) == 1  # the good ones still go


def test_an_attempt_that_crashes_backs_off_instead_of_looping(tmp_path, logged):
    class Crashing(Courier):
        def deliver(self, message, recipients):
            if not self.calls:
                self.calls.append(message.id)
                return defer.fail(RuntimeError("a bug"))
            return super().deliver(message, recipients)

    w = World(tmp_path, Crashing(250), scan_interval=5)
    w.start()
    w.send()
    assert len(w.courier.calls) == 1 and any("attempt failed" in line for line in logged)
    for _ in range(59):
        w.reactor.advance(5)
    assert len(w.courier.calls) == 1  # not at every scan
    w.reactor.advance(5)
    assert len(w.courier.calls) == 2 and w.queue.ids() == []


# The in-memory index: kept right by every change, and all the views read.

from mailserver.metrics import Metrics, server_metrics  # noqa: E402
from mailserver.relay.queue import QueueError as _QueueError  # noqa: E402
from mailserver.relay.view import QueueAdminView, queue_gauges  # noqa: E402


def assert_index_matches_disk(w):
    """
    The runner's index says what the envelopes on disk say.
    """
    on_disk = {m.id: m for m in (w.queue.load(i) for i in w.queue.ids())}
    index = w.runner.index
    assert sorted(e.id for e in index.entries()) == sorted(on_disk)
    for queue_id, m in on_disk.items():
        e = index.get(queue_id)
        assert (e.sender, e.pending, e.size, e.arrival, e.attempts, e.last_error) == (
            m.sender, tuple(r.address for r in m.pending()), m.size, m.arrival, m.attempts,
            m.last_error)
        if m.pending():
            assert e.next_attempt == m.next_attempt


def test_the_index_follows_enqueue_attempts_deferrals_and_requests(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    assert len(w.runner.index) == 0
    for to in ("a@one.test", "b@two.test", "c@two.test", "d@three.test"):
        w.send(to=(to,))
    assert_index_matches_disk(w)  # tried once, deferred
    assert {e.attempts for e in w.runner.index.entries()} == {1}
    w.reactor.advance(300)  # tried again
    assert_index_matches_disk(w)
    assert {e.attempts for e in w.runner.index.entries()} == {2}
    by_rcpt = {e.pending[0]: e.id for e in w.runner.index.entries()}
    w.queue.request("delete", by_rcpt["a@one.test"])
    w.queue.request("bounce", by_rcpt["b@two.test"])
    w.queue.request("flush", "domain:three.test")
    w.courier.codes = [250]
    w.reactor.advance(5)  # the scan applies them
    assert_index_matches_disk(w)
    assert [e.pending for e in w.runner.index.entries()] == [("c@two.test",)]
    assert len(w.bounces()) == 1
    assert w.runner.request("flush", by_rcpt["c@two.test"]) == 1
    w.reactor.advance(0)
    assert len(w.runner.index) == 0 and w.queue.ids() == []


def test_a_message_deleted_behind_the_runners_back_leaves_the_index_at_its_attempt(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=1000)
    w.start()
    w.send()
    [queue_id] = w.queue.ids()
    w.queue.remove(queue_id)
    assert queue_id in w.runner.index
    w.reactor.advance(300)
    assert len(w.runner.index) == 0


class NoFolderReads(QueueStore):
    """
    A queue store that fails the test when asked what is queued, once
    told to (the index must answer instead).
    """

    forbid = False

    def _check(self):
        assert not self.forbid, "the queue folder was read"

    def ids(self, ordered=True):
        self._check()
        return super().ids(ordered)

    def load(self, queue_id):
        self._check()
        return super().load(queue_id)


def test_views_metrics_etrn_and_scans_read_the_index_not_the_files(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.queue = w.runner._queue = store = NoFolderReads(w.config.queue_path, clock=w.reactor.seconds)
    w.intake._queue = store
    w.start()
    for n in range(30):
        w.send(to=(f"r{n}@{'one' if n % 3 else 'two'}.test",))
    ids = w.queue.ids()
    first_rcpt = w.queue.load(ids[0]).recipients[0].address
    in_one = next(i for i in ids if w.queue.load(i).recipients[0].address.endswith("@one.test"))
    store.forbid = True
    view = QueueAdminView(w.runner, w.reactor)
    metrics = Metrics()
    server_metrics(metrics, **queue_gauges(w.runner.index, w.reactor))
    w.reactor.advance(60)

    first, total, after = view.page(None, 20)
    rest, _, end = view.page(after, 20)
    assert [m["id"] for m in first + rest] == ids and total == 30 and end is None
    assert first[0] == {
        "id": ids[0], "sender": "s@example.org", "recipients": [first_rcpt],
        "size": first[0]["size"], "age_seconds": 60.0, "attempts": 1,
        "next_attempt_in_seconds": 240.0, "last_error": "451 4.3.0 try later",
    }
    text = metrics.render().decode()
    assert "\nrelay_queue_messages 30\n" in text and "\nrelay_queue_oldest_seconds 60.0\n" in text
    w.reactor.advance(5)  # one more scan, with nothing to take in
    assert w.runner.flush("two.test") == 10  # ETRN
    assert view.flush(in_one) and not view.flush("NOSUCHID")
    store.forbid = False
    w.reactor.advance(0)  # the flushed ones are tried (their attempts read them)
    assert len(w.courier.calls) == 30 + 10 + 1


def test_messages_queued_by_another_process_are_taken_in_at_the_next_scan(tmp_path):
    w = World(tmp_path, Courier(451), scan_interval=5)
    w.start()
    worker = QueueStore(w.config.queue_path, clock=w.reactor.seconds)  # a worker's: nobody to tell
    worker_intake = Intake(
        accounts=w.accounts, reactor=w.reactor, data_path=w.config.data_path,
        hostname=w.config.hostname, min_free_space=0, queue=worker, committer=InlineCommitter(),
    )
    receiver = worker_intake.begin(Envelope(
        sender="s@example.org", recipients=(Recipient(address="w@remote.test",
                                                      destinations=("w@remote.test",)),)))
    receiver.write(b"Subject: from a worker\r\n\r\nbody\r\n")
    receiver.finish()
    [queue_id] = w.queue.ids()
    assert queue_id not in w.runner.index and w.courier.calls == []
    assert (w.queue.incoming_path / queue_id).exists()
    w.reactor.advance(5)
    assert queue_id in w.runner.index and w.courier.calls == [(queue_id, ("w@remote.test",))]
    assert not (w.queue.incoming_path / queue_id).exists()
    assert_index_matches_disk(w)


def test_messages_queued_while_the_queue_is_read_at_start_are_kept(tmp_path):
    w = World(tmp_path, Courier(451))
    w.start()
    w.send(to=("old@remote.test",))
    w.runner.stopService()

    reads = []

    def io(f, *args):
        if not reads:  # the start-up read: held until the test lets it go
            d = defer.Deferred()
            reads.append((d, f))
            return d
        return defer.maybeDeferred(f, *args)

    w2 = World(tmp_path, Courier(250))
    w2.runner._io = io
    w2.start()
    w2.send(to=("new@remote.test",))
    w2.reactor.advance(0)
    assert w2.courier.calls == []  # nothing is tried before the queue is read
    assert [e.pending for e in w2.runner.index.entries()] == [("new@remote.test",)]
    d, read = reads[0]
    d.callback(read())
    w2.reactor.advance(300)
    assert sorted(c[1] for c in w2.courier.calls) == [("new@remote.test",), ("old@remote.test",)]
    assert w2.queue.ids() == [] and len(w2.runner.index) == 0


def test_a_request_for_an_unknown_id_is_refused(tmp_path):
    w = World(tmp_path, Courier(451))
    w.start()
    with pytest.raises(_QueueError, match="no queued message NOPE"):
        w.runner.request("delete", "NOPE")


def test_an_unreachable_domain_is_tried_a_few_times_per_rest_not_once_per_message(tmp_path, logged):
    w = World(tmp_path, Courier(441), max_connections_per_destination=1)
    w.start()
    courier_calls = lambda domain: [c for c in w.courier.calls if c[1][0].endswith(domain)]  # noqa: E731
    for n in range(5):
        w.send(to=(f"r{n}@down.test",))
    w.send(to=("a@other.test",))
    w.reactor.advance(0)
    assert len(courier_calls("@down.test")) == 1  # then it rests 300s
    assert len(courier_calls("@other.test")) == 1  # unreachable too: rests on its own
    [line] = [line for line in logged if "not reachable" in line and "destination=down.test" in line]
    assert "reply=451 4.4.1 cannot connect to mx.remote.test, seconds=300" in line
    waiting = [e for e in w.runner.index.entries() if e.pending[0].endswith("@down.test")]
    assert {e.next_attempt for e in waiting} == {300.0} and {e.attempts for e in waiting} == {0, 1}
    on_disk = [w.queue.load(e.id) for e in waiting if e.attempts == 0]
    assert {m.next_attempt for m in on_disk} == {0.0}  # put off in memory only
    w.reactor.advance(300)
    assert len(courier_calls("@down.test")) == 2  # one probe (and the next rest is 600s)
    # The probe is the first due by (time, id); ids of one millisecond order
    # by their random part, so it may be the message tried at first or not.
    never_tried = {e.id for e in waiting} - {c[0] for c in courier_calls("@down.test")}
    assert len(never_tried) in (3, 4)
    w.courier.codes = [451]  # a server answers now, if only with 4.3.0
    assert w.runner.flush("down.test") == 5  # ETRN ends the rest
    w.reactor.advance(0)
    assert len(courier_calls("@down.test")) == 7
    # 4.3.0 was an answer: no rest; each goes on its own schedule (300s
    # after a first attempt, 600s after a second or third).
    first_tried = {e.id for e in w.runner.index.entries() if e.attempts == 1}
    assert first_tried == never_tried
    w.reactor.advance(300)
    assert len(courier_calls("@down.test")) == 7 + len(never_tried)


def test_a_message_that_expires_while_its_domain_rests_is_bounced(tmp_path):
    w = World(tmp_path, Courier(441), max_connections_per_destination=1, max_age=600.0)
    w.start()
    w.send(to=("a@down.test",))
    w.send(to=("b@down.test",))  # waits: the domain rests after the first
    for _ in range(4):
        w.reactor.advance(300)
    assert w.queue.ids() == [] and len(w.runner.index) == 0
    assert len(w.bounces()) == 2


def test_turning_off_next_hop_verification_is_warned_at_start(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for verify in (True, False):
            world = World(tmp_path / str(verify), None, resolver=HostPort("127.0.0.1", 53),
                          smarthost=HostPort("127.0.0.1", 587), smarthost_tls_verify=verify)
            world.start()
            world.runner.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [formatEvent(e) for e in seen if e.get("event") == "relay.tls_unverified"]
    assert len(warnings) == 1 and "are not checked" in warnings[0]


def test_a_worker_sends_what_it_queued_and_hands_over_the_rest(tmp_path):
    """
    Issue 22, workers = N: a worker's relay sends what its own intake
    queued, from the message as committed; what is still queued after that
    first attempt goes to the primary (a mark in incoming/ and a word over
    the pipe); nothing of the queue folder is read.
    """
    from dataclasses import replace

    from mailserver.relay.worker_runner import WorkerRelayRunner, relay_share

    handed, flushes = [], []
    w = World(tmp_path, Courier(250, 451))
    w.runner = WorkerRelayRunner(
        hand_over=handed.append, ask_primary_to_flush=flushes.append, relay=w.config.relay, hostname=w.config.hostname,
        mta_sts_path=w.config.mta_sts_path, queue=w.queue, intake=w.intake,
        reactor=w.reactor, courier=w.courier, accounts=w.accounts, jitter=lambda d: d)
    w.queue.ids = lambda ordered=True: pytest.fail("a worker read the queue folder")
    w.start()
    w.send(to=("a@remote.test",))
    assert len(w.courier.calls) == 1 and handed == []
    assert list(w.queue.envelopes_path.iterdir()) == []  # sent and removed
    w.send(to=("b@remote.test",))
    [queue_id] = handed
    assert len(w.runner.index) == 0
    assert len(w.queue.recent_bodies) == 0  # the primary reads the file; none is left here
    assert [p.name for p in w.queue.incoming_path.iterdir()] == [queue_id]
    assert w.queue.load(queue_id).attempts == 1  # saved before the hand-over
    # ETRN: the primary keeps the queue, and its count.
    assert w.runner.flush("remote.test") is None and flushes == ["remote.test"]
    # Each of N processes gets its share of the connection limits.
    relay = w.config.relay
    two = relay_share(relay, 2)
    assert (two.max_connections, two.max_connections_per_destination) == (
        -(-relay.max_connections // 2), -(-relay.max_connections_per_destination // 2))
    assert relay_share(relay, 1) is relay
    assert relay_share(replace(relay, max_connections_per_destination=1), 3) \
        .max_connections_per_destination == 1
