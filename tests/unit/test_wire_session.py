"""
The line-session plumbing on its own, with a line protocol made up here
(it answers every line with its length): lines and limits, turns, waiting,
flow control, timers, closing and the TLS upgrade.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserver.wire.session import CLOSE_GRACE, COMMANDS_PER_TURN, TOO_LONG, LineSession


class Echo:
    """
    Answers each line with C{len=N}, a too-long line with C{too long};
    C{hold} makes the next line wait for a Deferred.
    """

    def __init__(self, limit=20, transport=None, **kwargs):
        self.clock = Clock()
        self.transport = StringTransport() if transport is None else transport
        self.timeouts = 0
        self.settled = 0
        self.hold: defer.Deferred | None = None
        self.limit = limit
        self.lines = LineSession(
            self.transport, self.clock, on_input=self.input, on_timeout=self.timed_out,
            on_settled=self.on_settled, line_timeout=30, max_errors=3, max_junk=2, **kwargs,
        )
        self.lines.start()

    def input(self) -> bool:
        line = self.lines.take_line(self.limit)
        if line is None:
            return False
        if line is TOO_LONG:
            self.lines.send(b"too long\r\n")
        else:
            self.lines.send(b"len=%d\r\n" % len(line))
        if self.hold is not None:
            self.lines.wait(self.hold, lambda result: self.lines.send(b"done %r\r\n" % (result,)))
            self.hold = None
        return True

    def timed_out(self):
        self.timeouts += 1
        self.lines.close()

    def on_settled(self):
        self.settled += 1

    def send(self, data: bytes) -> bytes:
        self.lines.feed(data)
        self.lines.process()
        out = self.transport.value()
        self.transport.clear()
        return out


def test_lines_end_in_crlf_or_a_bare_lf_and_replies_go_out_in_one_write():
    echo = Echo()
    writes = []
    echo.transport.write = writes.append
    echo.send(b"ab\r\ncde\nf")
    assert writes == [b"len=2\r\nlen=3\r\n"]
    echo.transport.write = StringTransport.write.__get__(echo.transport)
    assert echo.send(b"gh\r\n") == b"len=3\r\n"


def test_a_line_over_the_limit_is_refused_once_and_its_rest_thrown_away():
    echo = Echo(limit=20)
    assert echo.send(b"x" * 19 + b"\r\n") == b"too long\r\n"  # 21 octets with its CRLF
    assert echo.send(b"x" * 18 + b"\r\n") == b"len=18\r\n"
    assert echo.send(b"y" * 30) == b"too long\r\n"
    assert echo.send(b"y" * 30) == b""
    assert echo.send(b"y\r\nok\r\n") == b"len=2\r\n"


def test_a_turn_handles_a_share_of_the_lines_the_next_turn_the_rest():
    echo = Echo()
    out = echo.send(b"a\r\n" * (COMMANDS_PER_TURN + 5))
    assert out.count(b"len=1") == COMMANDS_PER_TURN
    assert echo.transport.producerState == "paused"  # the rest is already here
    echo.clock.advance(0)
    assert echo.transport.value().count(b"len=1") == 5
    assert echo.transport.producerState == "producing"


def test_a_long_line_can_be_refused_when_it_ends():
    echo = Echo(limit=20, refuse_long_lines_at_end=True)
    assert echo.send(b"y" * 30) == b""
    assert echo.send(b"y" * 30) == b""
    assert echo.send(b"y\r\nok\r\n") == b"too long\r\nlen=2\r\n"
    assert echo.send(b"x" * 19 + b"\r\n") == b"too long\r\n"  # whole, at once


class WritesKept(StringTransport):
    """
    A transport that keeps each write apart.
    """

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def test_replies_go_out_in_pieces_past_flush_octets():
    echo = Echo(flush_octets=12, transport=WritesKept())
    echo.send(b"a\r\nbb\r\nccc\r\ndddd\r\n")
    assert echo.transport.writes == [b"len=1\r\nlen=2\r\n", b"len=3\r\nlen=4\r\n"]


def test_a_turn_s_replies_go_out_in_one_write():
    echo = Echo(transport=WritesKept())
    echo.send(b"a\r\nbb\r\nccc\r\n")
    assert echo.transport.writes == [b"len=1\r\nlen=2\r\nlen=3\r\n"]


def test_reading_stops_while_many_lines_wait_for_a_reader():
    echo = Echo(max_pending_lines=3)
    echo.lines.reads.pauseProducing()  # the client reads no replies
    echo.send(b"a\r\n" * 3)
    assert echo.transport.producerState == "producing"
    echo.send(b"a\r\n")
    assert echo.transport.producerState == "paused"
    echo.lines.reads.resumeProducing()
    assert echo.transport.value().count(b"len=1") == 4
    assert echo.transport.producerState == "producing"


def test_input_waits_for_a_pending_deferred():
    echo = Echo()
    echo.hold = defer.Deferred()
    held = echo.hold
    assert echo.send(b"one\r\ntwo\r\n") == b"len=3\r\n"
    assert echo.lines.waiting and echo.settled == 0
    held.callback("x")
    assert echo.transport.value() == b"done 'x'\r\nlen=3\r\n"
    assert not echo.lines.waiting and echo.settled == 1


def test_a_pause_holds_the_next_lines_back():
    echo = Echo()
    echo.lines.pause(2.0, lambda _: echo.lines.send(b"later\r\n"))
    assert echo.send(b"a\r\n") == b""
    echo.clock.advance(2)
    assert echo.transport.value() == b"later\r\nlen=1\r\n"


def test_reading_stops_while_much_input_waits():
    echo = Echo()
    echo.hold = defer.Deferred()
    echo.send(b"a\r\n")
    echo.send(b"b" * 70_000)
    assert echo.transport.producerState == "paused"


def test_idle_timer_restarts_and_runs_out():
    echo = Echo()
    echo.clock.advance(29)
    echo.lines.restart_idle()
    echo.clock.advance(29)
    assert echo.timeouts == 0
    echo.lines.extend_idle(5)
    echo.clock.advance(5)
    assert echo.timeouts == 0
    echo.clock.advance(1)
    assert echo.timeouts == 1 and echo.lines.closed


def test_errors_and_junk_are_counted_to_their_limits():
    echo = Echo()
    assert [echo.lines.note_junk() for _ in range(5)] == [False, False, False, False, True]
    assert echo.lines.errors == 3


def test_close_sends_what_is_queued_and_cuts_off_a_client_that_does_not_read():
    echo = Echo()
    aborted = []
    echo.transport.abortConnection = lambda: aborted.append(True)
    echo.lines.send(b"bye\r\n")
    echo.lines.close()
    assert echo.transport.value() == b"bye\r\n" and echo.transport.disconnecting
    assert echo.transport.producer is None  # unregistered, so the close can complete
    echo.clock.advance(CLOSE_GRACE - 0.1)
    assert aborted == []
    echo.clock.advance(0.1)
    assert aborted == [True]
    echo.transport.clear()
    assert echo.send(b"more\r\n") == b""  # nothing is handled once closed


def test_lost_leaves_no_timer_behind():
    echo = Echo()
    echo.lines.close()
    echo.lines.lost()
    assert echo.clock.getDelayedCalls() == []


def test_lost_during_a_pause_leaves_no_timer_behind():
    echo = Echo()
    echo.lines.pause(2.0, lambda _: echo.lines.send(b"later\r\n"))
    echo.lines.lost()
    assert echo.clock.getDelayedCalls() == []


def test_start_tls_throws_away_what_came_in_plaintext():
    class TLSTransport(StringTransport):
        started = None

        def startTLS(self, options):
            self.started = options

    echo = Echo()
    echo.transport = echo.lines.transport = TLSTransport()

    def input():
        line = echo.lines.take_line(20)
        if line is None:
            return False
        echo.lines.send(b"go\r\n")
        echo.lines.start_tls("options")
        return True

    echo.lines._on_input = input
    assert echo.send(b"STARTTLS\r\nINJECTED\r\n") == b"go\r\n"
    assert echo.transport.started == "options" and echo.lines.take_all() == b""


def test_no_delay_is_asked_of_a_tcp_transport():
    class TCP(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    transport = TCP()
    LineSession(transport, Clock(), on_input=lambda: False, on_timeout=lambda: None,
                line_timeout=1, max_errors=1)
    assert transport.no_delay is True
