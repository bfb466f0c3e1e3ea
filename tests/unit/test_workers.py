"""
Sharing failed logins between the worker processes: the line format, and
the primary passing each worker's failures to the others.
"""

import os

from twisted.internet.task import Clock

from mailserver.login_throttle import LoginThrottle
from mailserver.workers import FAILURES_FD, FailureLines, PrimaryLink, WorkerPool, _Worker, failure_line


def test_only_ip_address_keys_make_lines():
    assert failure_line("192.0.2.1") == b"192.0.2.1\n"
    assert failure_line("2001:db8:1:2::/64") == b"2001:db8:1:2::/64\n"
    assert failure_line("not an address") is None
    assert failure_line("192.0.2.1\n10.0.0.1") is None


def test_lines_are_read_across_reads_and_junk_is_skipped():
    lines = FailureLines()
    assert list(lines.feed(b"192.0.2.1\n192.0")) == ["192.0.2.1"]
    assert list(lines.feed(b".2.2\nrm -rf /\n\n" + b"1" * 100 + b"\n::1\n")) == ["192.0.2.2", "::1"]
    assert list(lines.feed(b"9" * 5000)) == []  # an endless line is dropped, not held
    assert list(lines.feed(b"\n10.0.0.1\n")) == ["10.0.0.1"]


class _FakeProcess:
    def __init__(self):
        self.stdin = b""

    def writeToChild(self, fd, data):
        assert fd == 0
        self.stdin += data


def _pool_of(count: int, throttle: LoginThrottle) -> tuple[WorkerPool, list[_Worker]]:
    pool = WorkerPool(Clock(), count, [], throttle)
    throttle.share_with(pool._tell_workers)  # as startService does
    workers = []
    for index in range(1, count):
        worker = _Worker(pool, index)
        worker.makeConnection(_FakeProcess())
        pool._workers[index] = worker
        workers.append(worker)
    return pool, workers


def test_the_primary_counts_a_workers_failure_and_tells_the_other_workers():
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    pool, (first, second, third) = _pool_of(4, throttle)
    first.childDataReceived(FAILURES_FD, b"192.0.2.1\n")
    first.childDataReceived(1, b"192.0.2.1\n")  # its log output is not a report
    assert first.transport.stdin == b""
    assert second.transport.stdin == third.transport.stdin == b"192.0.2.1\n"
    throttle.failed("192.0.2.1")  # and the primary's own failure goes to all
    assert [w.transport.stdin for w in (first, second, third)] == [
        b"192.0.2.1\n", b"192.0.2.1\n192.0.2.1\n", b"192.0.2.1\n192.0.2.1\n"
    ]
    assert throttle.refused("192.0.2.1")


class _FakeStdio:
    def __init__(self, protocol, stdin, stdout, reactor):
        self.opened = (stdin, stdout)
        self.written = b""
        protocol.makeConnection(self)
        self.protocol = protocol

    def write(self, data):
        self.written += data


def test_a_worker_reports_its_failures_and_counts_the_primarys():
    read_end, write_end = os.pipe()  # stands in for the pipe a worker inherits
    opened: list[_FakeStdio] = []

    def open_stdio(*args, **kwargs):
        opened.append(_FakeStdio(*args, **kwargs))

    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    try:
        PrimaryLink(Clock(), throttle, open_stdio=open_stdio, failures_fd=write_end).startService()
    finally:
        os.close(read_end)
        os.close(write_end)
    (stdio,) = opened
    assert stdio.opened == (0, write_end)
    throttle.failed("192.0.2.5")
    assert stdio.written == b"192.0.2.5\n"
    stdio.protocol.dataReceived(b"192.0.2.5\n")
    assert throttle.refused("192.0.2.5")
    assert stdio.written == b"192.0.2.5\n"


def test_a_worker_without_the_pipe_counts_alone():
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)  # a descriptor number nothing holds now
    opened = []
    throttle = LoginThrottle(Clock(), delay=1.0, limit=2, window=600)
    PrimaryLink(Clock(), throttle, open_stdio=lambda *a, **k: opened.append(a), failures_fd=write_end).startService()
    assert opened == []
    assert throttle.failed("192.0.2.5") == 1.0
