"""
What the worker processes and the primary tell each other: the line format,
the primary passing one worker's failed logins to the others, and the
primary's metrics counting every process.
"""

import os

from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver.login_throttle import LoginThrottle
from mailserver.metrics import Metrics, server_metrics
from mailserver.worker_link import (
    METRICS_INTERVAL,
    TO_PRIMARY_FD,
    Lines,
    PrimaryLink,
    failure_line,
    flush_line,
    metrics_line,
    queued_line,
)
from mailserver.workers import WorkerPool, _Worker


def _fail(throttle: LoginThrottle, address: str) -> float:
    """
    A failed password check counted here; the delay before its answer.
    """
    throttle.check(address, lambda: defer.fail(UnauthorizedLogin())).addErrback(
        lambda failure: failure.trap(LoginFailed)
    )
    return throttle.delay(address)


def test_only_ip_address_keys_make_failure_lines():
    assert failure_line("192.0.2.1") == b"F 192.0.2.1\n"
    assert failure_line("2001:db8:1:2::/64") == b"F 2001:db8:1:2::/64\n"
    assert failure_line("not an address") is None
    assert failure_line("192.0.2.1\n10.0.0.1") is None


def test_lines_are_read_across_reads_and_junk_is_skipped():
    lines = Lines()
    assert list(lines.feed(b"F 192.0.2.1\nF 192.0")) == [("F", "192.0.2.1")]
    assert list(lines.feed(b".2.2\nF rm -rf /\n\nX 1\nM {not json\nM [1]\n" + metrics_line({"a": []}))) == [
        ("F", "192.0.2.2"), ("M", {"a": []})
    ]
    assert list(lines.feed(b"9" * (2 << 20))) == []  # an endless line is dropped, not held
    assert list(lines.feed(b"\nF 10.0.0.1\n")) == [("F", "10.0.0.1")]


def test_a_worker_tells_the_primary_of_mail_it_queued_for_the_relay():
    """
    Issue 22: the primary's relay scans at once, not at its next interval.
    """
    assert queued_line("1K1YH307T0J00ECY") == b"Q 1K1YH307T0J00ECY\n"
    assert queued_line("../etc") is None and queued_line("a b") is None
    lines = Lines()
    assert list(lines.feed(b"Q 1K1YH307T0J00ECY\nQ ../x\nQ \n")) == [("Q", "1K1YH307T0J00ECY")]
    scans = []
    pool = WorkerPool(Clock(), 2, [], LoginThrottle(Clock(), delay=1.0, limit=2, window=600),
                      Metrics(), on_queued=lambda: scans.append(1))
    worker = _Worker(pool, 1)
    worker.childDataReceived(TO_PRIMARY_FD, b"Q 1K1YH307T0J00ECY\nQ 1K1YH307T0J00ECZ\n")
    assert scans == [1, 1]


def test_a_worker_passes_etrn_on_to_the_primary():
    assert flush_line("remote.test") == b"E remote.test\n"
    assert flush_line("bücher.test") == "E bücher.test\n".encode()
    assert flush_line("a b") is None and flush_line("a\nQ x") is None and flush_line("") is None
    lines = Lines()
    assert list(lines.feed(b"E remote.test\nE \nE a\xff\nE x y\n")) == [("E", "remote.test")]
    flushed = []
    pool = WorkerPool(Clock(), 2, [], LoginThrottle(Clock(), delay=1.0, limit=2, window=600),
                      Metrics(), on_flush=flushed.append)
    _Worker(pool, 1).childDataReceived(TO_PRIMARY_FD, b"E remote.test\nE other.test\n")
    assert flushed == ["remote.test", "other.test"]


class _FakeProcess:
    def __init__(self):
        self.stdin = b""

    def writeToChild(self, fd, data):
        assert fd == 0
        self.stdin += data


def _registry(queued: int = 7, oldest: float = 0) -> tuple[Metrics, object]:
    metrics = Metrics()
    return metrics, server_metrics(metrics, queue_messages=lambda: queued,
                                   queue_oldest_seconds=lambda: oldest)


def _pool_of(count: int, throttle: LoginThrottle, metrics: Metrics | None = None):
    pool = WorkerPool(Clock(), count, [], throttle, metrics or Metrics())
    workers = []  # as startService would spawn them
    for index in range(1, count):
        worker = _Worker(pool, index)
        worker.makeConnection(_FakeProcess())
        pool._workers[index] = worker
        workers.append(worker)
    return pool, workers


def test_the_primary_counts_a_workers_failure_and_tells_the_other_workers():
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    pool, (first, second, third) = _pool_of(4, throttle)
    first.childDataReceived(TO_PRIMARY_FD, b"F 192.0.2.1\n")
    first.childDataReceived(1, b"F 192.0.2.1\n")  # its log output is not a report
    assert first.transport.stdin == b""
    assert second.transport.stdin == third.transport.stdin == b"F 192.0.2.1\n"
    _fail(throttle, "192.0.2.1")  # and the primary's own failure goes to all
    assert [w.transport.stdin for w in (first, second, third)] == [
        b"F 192.0.2.1\n", b"F 192.0.2.1\nF 192.0.2.1\n", b"F 192.0.2.1\nF 192.0.2.1\n"
    ]
    assert throttle.refused("192.0.2.1")


def _sample(metrics: Metrics, line_start: str) -> str:
    (line,) = [l for l in metrics.render().decode().splitlines() if l.startswith(line_start + " ")]
    return line.rpartition(" ")[2]


def test_the_primarys_metrics_add_in_the_workers_and_keep_an_ended_workers_counters():
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    primary, mine = _registry()
    pool, (first, second) = _pool_of(3, throttle, primary)
    mine.smtp_messages_accepted_total.inc(role="smtp")
    mine.smtp_transaction_seconds.observe(0.02)
    for worker, accepted, queued, oldest in ((first, 10, 2, 30.5), (second, 5, 1, 4.0)):
        # A worker's relay holds what it is sending the first time.
        registry, theirs = _registry(queued, oldest)
        theirs.smtp_messages_accepted_total.inc(accepted, role="smtp")
        theirs.smtp_connections_active.inc(2, role="smtp")
        theirs.smtp_transaction_seconds.observe(0.02)
        theirs.smtp_transaction_seconds.observe(400)
        worker.childDataReceived(TO_PRIMARY_FD, metrics_line(registry.snapshot()))
    assert _sample(primary, 'smtp_messages_accepted_total{role="smtp"}') == "16"
    assert _sample(primary, 'smtp_connections_active{role="smtp"}') == "4"
    assert _sample(primary, 'smtp_transaction_seconds_bucket{le="0.05"}') == "3"
    assert _sample(primary, "smtp_transaction_seconds_count") == "5"
    assert _sample(primary, "relay_queue_messages") == "10"  # every process's, added up
    assert _sample(primary, "relay_queue_oldest_seconds") == "30.5"  # the oldest anywhere
    first.processEnded(None)
    assert _sample(primary, "relay_queue_messages") == "8"
    assert _sample(primary, "relay_queue_oldest_seconds") == "4.0"
    assert _sample(primary, 'smtp_messages_accepted_total{role="smtp"}') == "16"  # kept
    assert _sample(primary, 'smtp_connections_active{role="smtp"}') == "2"  # its connections went with it
    assert _sample(primary, "smtp_transaction_seconds_count") == "5"
    assert mine.smtp_messages_accepted_total.value(role="smtp") == 11


def test_a_workers_log_lines_go_whole_into_the_primarys_log():
    # twistd's --logfile is the primary's alone (two processes rotating one
    # file lose lines), and a daemon's standard output is /dev/null.
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    pool, (first, second) = _pool_of(3, throttle)
    written = []
    pool.worker_output = written.append
    first.childDataReceived(1, b"2026-12-06T15:00:00+0000 [smtp.rejected#warn] refused comm")
    second.childDataReceived(1, b"2026-12-06T15:00:00+0000 [smtp.accepted#info] one\n")
    first.childDataReceived(1, b"and=RCPT\n2026-12-06T15:00:01+0000 [x#info] next\nhalf")
    second.childDataReceived(2, b"Traceback (most recent call last):\n")
    assert written == [
        b"2026-12-06T15:00:00+0000 [smtp.accepted#info] one\n",
        b"2026-12-06T15:00:00+0000 [smtp.rejected#warn] refused command=RCPT\n"
        b"2026-12-06T15:00:01+0000 [x#info] next\n",
        b"Traceback (most recent call last):\n",
    ]
    first.childConnectionLost(1)  # what it wrote last, without its line end
    assert written[-1] == b"half\n"
    first.childDataReceived(TO_PRIMARY_FD, b"F 192.0.2.1\n")  # reports are not log lines
    assert len(written) == 4


def test_workers_get_pipes_for_their_output_only_when_the_primary_takes_it(monkeypatch):
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    spawned = []

    class Reactor(Clock):
        def spawnProcess(self, protocol, executable, args, env, childFDs):
            spawned.append(childFDs)
            process = _FakeProcess()
            process.pid = 1000 + len(spawned)
            return process

    for output, expected in ((None, (1, 2)), (print, ("r", "r"))):
        pool = WorkerPool(Reactor(), 2, [], throttle, Metrics(), worker_output=output)
        pool._sockets[1] = []
        pool._spawn(1)
        assert (spawned[-1][1], spawned[-1][2]) == expected


def test_a_snapshot_that_does_not_fit_is_left_out():
    primary, mine = _registry()
    mine.smtp_messages_accepted_total.inc(role="smtp")
    primary.count_elsewhere(lambda: [
        {"smtp_messages_accepted_total": [
            [["smtp"], "many"], [["smtp", "extra"], 3], [["smtp"], True], [["smtp"], float("nan")], "x"
        ]},
        {"smtp_transaction_seconds": [[[], [1, 2]]]},  # not the histogram's buckets
        {"smtp_messages_accepted_total": 5, "no_such_metric": [[[], 1]]},
        "not a snapshot",
    ])
    assert _sample(primary, 'smtp_messages_accepted_total{role="smtp"}') == "1"
    assert _sample(primary, "smtp_transaction_seconds_count") == "0"


class _FakeStdio:
    def __init__(self, protocol, stdin, stdout, reactor):
        self.opened = (stdin, stdout)
        self.written = b""
        protocol.makeConnection(self)
        self.protocol = protocol

    def write(self, data):
        self.written += data


def test_a_worker_reports_failures_and_changed_metrics_and_counts_the_primarys_failures():
    read_end, write_end = os.pipe()  # stands in for the pipe a worker inherits
    opened: list[_FakeStdio] = []
    clock = Clock()
    throttle = LoginThrottle(clock, delay=1.0, limit=2, window=600)
    registry, instruments = _registry()
    link = PrimaryLink(
        clock, throttle, registry, open_stdio=lambda *a, **k: opened.append(_FakeStdio(*a, **k)),
        to_primary_fd=write_end,
    )
    try:
        link.startService()
    finally:
        os.close(read_end)
        os.close(write_end)
    (stdio,) = opened
    assert stdio.opened == (0, write_end)
    _fail(throttle, "192.0.2.5")
    assert stdio.written == b"F 192.0.2.5\n"
    stdio.protocol.dataReceived(b"F 192.0.2.5\n")
    assert throttle.refused("192.0.2.5")
    assert stdio.written == b"F 192.0.2.5\n"  # not echoed back

    clock.advance(METRICS_INTERVAL)
    first = metrics_line(registry.snapshot())
    assert stdio.written == b"F 192.0.2.5\n" + first
    clock.advance(METRICS_INTERVAL)  # nothing changed: nothing sent
    assert stdio.written == b"F 192.0.2.5\n" + first
    instruments.pop3_logins_total.inc()
    link.stopService()  # the last counts go before the worker ends
    assert stdio.written == b"F 192.0.2.5\n" + first + metrics_line(registry.snapshot())
    assert b'"pop3_logins_total":[[[],1]]' in stdio.written


def test_a_worker_without_the_pipe_keeps_everything_to_itself():
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)  # a descriptor number nothing holds now
    opened = []
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    link = PrimaryLink(Clock(), throttle, Metrics(), open_stdio=lambda *a, **k: opened.append(a), to_primary_fd=write_end)
    link.startService()
    assert opened == []
    assert _fail(throttle, "192.0.2.5") == 1.0
    link.stopService()
