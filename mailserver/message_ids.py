"""
The one ID of a message, from its acceptance to its last delivery: in the
250 reply, our C{Received:} field, the Maildir file's name, the relay
queue, every log line about it, the webhook's events and the reports we
send about it.

An ID is 16 characters of Crockford's base32 (digits and upper-case
letters without I, L, O and U): 11 for the time in microseconds, 5 for the
process id.  Within a process the microseconds only go up (a second ID in
the same microsecond takes the next one), and no two live processes share
an id; a process that ends and a later one with its pid cannot meet in
the same microsecond unless the clock went back.  So IDs are unique
across the workers and across restarts, safe in a file name, sort by
time, and tell which process made them (L{writer_pid}), which the
start-up clean-up of unfinished files needs.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}
_TIME_DIGITS = 11  # 55 bits of microseconds: until the year 3111
_PID_DIGITS = 5  # 25 bits: Linux's pid_max is at most 2**22
LENGTH = _TIME_DIGITS + _PID_DIGITS


# Two digits (10 bits) at a time: an ID is 8 look-ups, made for every message.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = tuple(range(5 * (LENGTH - 2), -1, -10))


def _encode(micros: int, pid: int) -> str:
    """
    The ID of C{micros} and C{pid}: 11 digits of the one, 5 of the other.
    """
    number = micros << (5 * _PID_DIGITS) | pid
    return "".join([_PAIRS[number >> shift & 1023] for shift in _SHIFTS])


class MessageIDs:
    """
    Makes IDs for this process.

    @param clock: seconds since the epoch (C{time.time}).
    @param pid: this process's id (C{os.getpid}, read at each ID, so a
        forked worker never repeats its parent's IDs).
    """

    def __init__(self, clock=time.time, pid=os.getpid) -> None:
        self._clock = clock
        self._pid = pid
        self._last = 0
        self._last_pid = -1
        self._lock = threading.Lock()

    def next(self) -> str:
        pid = self._pid()
        with self._lock:
            micros = int(self._clock() * 1_000_000)
            if pid == self._last_pid and micros <= self._last:
                micros = self._last + 1
            self._last, self._last_pid = micros, pid
        return _encode(micros, pid)


_ids = MessageIDs()


def new_message_id() -> str:
    """
    A new ID, from this process's L{MessageIDs}.
    """
    return _ids.next()


def is_message_id(text: str) -> bool:
    return len(text) == LENGTH and all(c in _VALUE for c in text)


def writer_pid(name: str) -> int | None:
    """
    The process id in a name that starts with an ID, or C{None}.
    """
    prefix = name[:LENGTH]
    if not is_message_id(prefix) or (len(name) > LENGTH and name[LENGTH] != "."):
        return None
    value = 0
    for c in prefix[_TIME_DIGITS:]:
        value = value * 32 + _VALUE[c]
    return value

