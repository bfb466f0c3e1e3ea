"""
Message IDs: short, safe in a file name, in time order, unique within a
process even when the clock stands still or steps back, distinct between
processes, and telling which process made them.
"""

import os
import re

from mailserver.message_ids import LENGTH, MessageIDs, is_message_id, new_message_id, writer_pid


def test_form_and_order():
    ids = [new_message_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{16}", i) for i in ids) and LENGTH == 16
    assert writer_pid(ids[0]) == os.getpid()


def test_a_clock_that_stands_still_or_steps_back():
    now = [1_800_000_000.0]
    ids = MessageIDs(clock=lambda: now[0], pid=lambda: 4242)
    first = [ids.next() for _ in range(3)]
    now[0] -= 5  # the clock steps back
    later = [ids.next() for _ in range(3)]
    assert first + later == sorted(set(first + later))
    assert {writer_pid(i) for i in first + later} == {4242}


def test_processes_do_not_collide_in_the_same_microsecond():
    ids = [MessageIDs(clock=lambda: 1_800_000_000.0, pid=lambda p=p: p).next() for p in (1, 2, 2**22)]
    assert len(set(ids)) == 3
    assert [writer_pid(i) for i in ids] == [1, 2, 2**22]


def test_the_writer_of_a_file_name():
    message_id = MessageIDs(pid=lambda: 99).next()
    assert writer_pid(f"{message_id}.mx.example.org") == 99
    assert writer_pid(message_id) == 99
    for name in ("1700000000.M1P99Q1.mx", f"{message_id}x.mx", "IL" + message_id[2:], ""):
        assert writer_pid(name) is None
    assert is_message_id(message_id) and not is_message_id(message_id.lower())
