"""
The plumbing of one line-based server session, whatever the protocol:
input cut into lines under a length limit, replies batched into one write,
reading no faster than the client reads (L{ReadControl}), a fair share of
the reactor, the idle timer, waiting for a Deferred before the next
command, closing with a grace period, error and junk-command counts, and
the TLS upgrade.

A protocol's glue owns one L{LineSession} (composition: the protocol stays
a plain C{Protocol}) and tells it what to do; it knows no protocol: it
calls the glue back to consume input (C{on_input}), when the idle timer
runs out (C{on_timeout}) and when a turn's input is handled with nothing
pending (C{on_settled}), and what a reply looks like is the glue's business.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer

from mailserver.immediate_write import write_now
from mailserver.wire.flow import INPUT, ReadControl

# Commands handled for one client before the others get their turn.
COMMANDS_PER_TURN = 100
# Input held while a command is being handled (or replies pile up unread),
# past which reading stops.
MAX_PENDING_INPUT = 64 * 1024
# Seconds a closing connection gets to take its last replies; a client that
# does not read them is cut off then, not kept for ever.
CLOSE_GRACE = 10.0


class _TooLong:
    def __repr__(self) -> str:
        return "TOO_LONG"


# What L{LineSession.take_line} gives for a line over the limit, once per line.
TOO_LONG = _TooLong()


class LineSession:
    """
    @param on_input: consume what the session holds (L{take_line}, L{take},
        L{take_all}); return C{False} when more bytes are needed first.
    @param on_timeout: the idle timer ran out.
    @param on_settled: everything complete in the input is handled and no
        Deferred is pending (e.g. time to close a session told to shut down).
    @param line_timeout: seconds a client gets for its next line; restarted
        by L{restart_idle}.
    @param max_errors: errors (L{note_error}) at which the glue should close.
    @param max_junk: junk commands (L{note_junk}) allowed before each counts
        as an error.
    @param flush_octets: replies queued past this many octets are written
        at once rather than at the end of the turn (a turn of large
        replies is not held in memory whole); C{None}: no such limit.
    @param max_pending_lines: complete lines held while they cannot be
        handled, past which reading stops (besides L{MAX_PENDING_INPUT}).
    @param refuse_long_lines_at_end: say L{TOO_LONG} when the over-long
        line's end arrives, as an answer to that line, rather than as soon
        as it passes the limit.
    """

    def __init__(
        self,
        transport,
        clock,
        *,
        on_input: Callable[[], bool],
        on_timeout: Callable[[], None],
        on_settled: Callable[[], None] | None = None,
        line_timeout: float,
        max_errors: int,
        max_junk: int = 0,
        flush_octets: int | None = None,
        max_pending_lines: int | None = None,
        refuse_long_lines_at_end: bool = False,
    ) -> None:
        self.transport = transport
        self._flush_octets = flush_octets
        self._outgoing_octets = 0
        self._max_pending_lines = max_pending_lines
        self._long_lines_at_end = refuse_long_lines_at_end
        self._clock = clock
        self._on_input = on_input
        self._on_timeout = on_timeout
        self._on_settled = on_settled
        self._line_timeout = line_timeout
        self._max_errors = max_errors
        self._max_junk = max_junk
        self._buffer = b""
        self._start = 0
        self._discarding = False
        self._outgoing: list[bytes] = []
        self._waiting: defer.Deferred | None = None
        self._processing = False
        self._turn = 0
        self._idle_call = None
        self._abort_call = None
        self._pause_call = None
        self.errors = 0
        self.junk = 0
        self.closed = False
        self.reads = ReadControl(transport, self.process)
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)  # every reply goes out in one write
            except OSError:  # not a TCP socket after all
                pass

    def start(self) -> None:
        """
        The session is admitted: read under flow control, time the client.
        """
        self.reads.attach()
        self.restart_idle()

    # Input.

    def feed(self, data: bytes) -> None:
        """
        Keep what the client sent; stop reading the socket while it holds
        more than L{MAX_PENDING_INPUT} that cannot be handled yet.
        """
        if self._start:
            self._buffer = self._buffer[self._start :] + data
            self._start = 0
        else:
            self._buffer += data
        if (self._waiting is not None or not self.reads.writable) and (
            len(self._buffer) > MAX_PENDING_INPUT
            or (
                self._max_pending_lines is not None
                and self._buffer.count(b"\n") > self._max_pending_lines
            )
        ):
            self.reads.hold(INPUT)

    def take_line(self, limit: int) -> bytes | _TooLong | None:
        """
        The next line without its line end (CRLF, or a bare LF as Postfix
        takes it), L{TOO_LONG} for a line of more than C{limit} octets with
        its CRLF (whose rest is then thrown away as it arrives), or C{None}
        while the line is incomplete or the next command may not be handled
        now: while a Deferred is pending, once closed, while the client
        does not read its replies, or past this turn's share.
        """
        if (
            self._waiting is not None
            or self.closed
            or not self.reads.writable
            or self._turn >= COMMANDS_PER_TURN
        ):
            return None
        buffer = self._buffer
        while True:
            start = self._start
            newline = buffer.find(b"\n", start)
            if newline < 0:
                if len(buffer) - start > limit:
                    self._start = len(buffer)
                    if not self._discarding:
                        self._discarding = True
                        if not self._long_lines_at_end:
                            return TOO_LONG
                return None
            self._start = newline + 1
            self._turn += 1
            if self._discarding:  # the end of a line already thrown away
                self._discarding = False
                if self._long_lines_at_end:
                    return TOO_LONG
                continue
            line = buffer[start:newline]
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) + 2 > limit:
                return TOO_LONG
            return line

    def take(self, size: int) -> bytes:
        """
        Up to C{size} octets, as they came (a BDAT chunk).
        """
        start = self._start
        piece = self._buffer[start : start + size]
        self._start = start + len(piece)
        return piece

    def take_all(self) -> bytes:
        data = self._buffer[self._start :] if self._start else self._buffer
        self._buffer = b""
        self._start = 0
        return data

    def unread_bytes(self, data: bytes) -> None:
        """
        Put back what L{take_all} took and was not used (the commands after
        a message's end).
        """
        self._buffer = data + self._buffer[self._start :]
        self._start = 0

    def unread(self) -> int:
        """
        Octets received and not yet taken: what a client sent while the
        session was waiting (before the greeting, it is an early talker).
        """
        return len(self._buffer) - self._start

    def discard_input(self) -> None:
        self._buffer = b""
        self._start = 0
        self._discarding = False

    # Handling, a turn at a time.

    def process(self) -> None:
        """
        Have everything complete in the input handled, then write all the
        replies at once (what PIPELINING, RFC 2920, asks for).  Stops while
        a Deferred is pending and after L{COMMANDS_PER_TURN} lines: the rest
        waits for the reactor's next turn, so one client's flood of
        pipelined commands does not hold up every other session.
        """
        if self._processing:
            return
        self._processing = True
        self._turn = 0
        try:
            while (
                self._start < len(self._buffer)
                and self._waiting is None
                and not self.closed
                and self.reads.writable
                and self._turn < COMMANDS_PER_TURN
            ):
                if not self._on_input():
                    break
        finally:
            self._processing = False
            if self._start:
                self._buffer = self._buffer[self._start :]
                self._start = 0
        if self._turn >= COMMANDS_PER_TURN and not self.closed:
            self.reads.hold(INPUT)  # the next turn's input is already here
            self._clock.callLater(0, self._next_turn)
        elif self._waiting is None:
            if self._on_settled is not None:
                self._on_settled()
            if self.reads.writable:
                self.reads.release(INPUT)  # what was held has been handled
        self.flush()

    def _next_turn(self) -> None:
        if not self.closed:
            self.process()

    def wait(self, waiting: defer.Deferred, then: Callable[[object], None]) -> None:
        """
        Handle no more input until C{waiting} fires, then give its result
        (or L{Failure}) to C{then} and go on with what the client sent
        meanwhile.  Nothing is called once the session is closed.
        """
        self._waiting = waiting
        waiting.addBoth(self._finished_waiting, waiting, then)

    def _finished_waiting(self, result, waiting, then) -> None:
        if self._waiting is not waiting:
            return
        self._waiting = None
        if self.closed:
            return
        then(result)
        self.process()

    def pause(self, seconds: float, then: Callable[[object], None]) -> None:
        """
        L{wait} C{seconds} (a failed login's answer is held back so).
        """
        paused: defer.Deferred = defer.Deferred()
        self._pause_call = self._clock.callLater(seconds, paused.callback, None)
        self.wait(paused, then)

    @property
    def waiting(self) -> bool:
        return self._waiting is not None

    # Output.

    def send(self, data: bytes) -> None:
        """
        Queue a reply; it goes out with the rest of the turn's replies.
        """
        self._outgoing.append(data)
        if self._flush_octets is not None:
            self._outgoing_octets += len(data)
            if self._outgoing_octets >= self._flush_octets:
                self.flush()

    def flush(self) -> None:
        if self._outgoing:
            data = b"".join(self._outgoing)
            self._outgoing = []
            self._outgoing_octets = 0
            # At once, not on the reactor's next turn (immediate_write).
            write_now(self.transport, data)

    # Counting what a client should not do.

    def note_error(self) -> bool:
        """
        Count an error; return whether the client has made too many.
        """
        self.errors += 1
        return self.errors >= self._max_errors

    def note_junk(self) -> bool:
        """
        Count a command that costs us and moves no mail (RFC 5321 4.5.3.2);
        past the allowance each counts as an error, so a flood of them ends
        (Postfix's C{smtpd_junk_command_limit}).  Return whether the client
        has now made too many errors.
        """
        self.junk += 1
        return self.junk > self._max_junk and self.note_error()

    # Timers.

    def restart_idle(self, timeout: float | None = None) -> None:
        """
        Give the client C{timeout} seconds (by default a line's) from now.
        """
        if timeout is None:
            timeout = self._line_timeout
        call = self._idle_call
        if call is not None and call.active():
            call.reset(timeout)
        else:
            self._idle_call = self._clock.callLater(timeout, self._timed_out)

    def set_line_timeout(self, seconds: float) -> None:
        """
        From now on give the client C{seconds} for each line (e.g. longer
        once it has logged in), counting from now.
        """
        self._line_timeout = seconds
        if self._idle_call is not None and self._idle_call.active():
            self.restart_idle()

    def extend_idle(self, seconds: float) -> None:
        call = self._idle_call
        if call is not None and call.active():
            call.delay(seconds)

    def stop_idle(self) -> None:
        call = self._idle_call
        if call is not None and call.active():
            call.cancel()
        self._idle_call = None

    def _timed_out(self) -> None:
        self._idle_call = None
        self._on_timeout()

    # The end, and TLS.

    def start_tls(self, options) -> None:
        """
        Send the last plaintext replies and start TLS; whatever the client
        sent after its command arrived in plaintext and is thrown away
        unread (RFC 3207 4.2, RFC 2595 4).
        """
        self.flush()
        self.discard_input()
        self.transport.startTLS(options)

    def close(self) -> None:
        """
        Send the last replies and close; a client that does not take them
        within L{CLOSE_GRACE} seconds is cut off.
        """
        self.flush()
        if self.closed:
            return
        self.closed = True
        self.stop_idle()
        self.reads.closing()
        self.transport.loseConnection()
        self._abort_call = self._clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def lost(self) -> None:
        """
        The connection is gone: no timer may outlive it.
        """
        self.closed = True
        self.stop_idle()
        for call in (self._abort_call, self._pause_call):
            if call is not None and call.active():
                call.cancel()
