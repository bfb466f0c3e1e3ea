"""
Many clients each in the middle of a large message hold no more memory than
the budget: the header sections and bodies waiting for the message hooks
count against it like the intake's own buffers, and past it go to disk.
"""

from __future__ import annotations

import tracemalloc

from twisted.internet import defer
from zope.interface import implementer

from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks
from mailserver.interfaces import IMessageHook
from mailserver.testing import MemoryIntake, SMTPHarness, reply_codes

MiB = 1024 * 1024
SESSIONS = 40
BUDGET = 64 * MiB  # limits.memory_budget's default
SLACK = 4 * MiB  # the sessions themselves, their last pieces, the fakes


@implementer(IMessageHook)
class Accept:
    def message(self, envelope, headers, body):
        return defer.succeed(None)


def pieces(total: int, line: bytes):
    """
    C{total} octets of C{line}s, in 64 KiB pieces as a socket gives them.
    """
    data = line * (64 * 1024 // len(line))
    for _ in range(total // len(data)):
        yield data


def test_sessions_midway_through_large_messages_hold_no_more_than_the_budget(tmp_path):
    inner = MemoryIntake()
    first = SMTPHarness(intake=HookedIntake(inner, Hooks([("accept", Accept())]), tmp_path))
    factory = first.factory
    sessions = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(SESSIONS):
            session = SMTPHarness(factory=factory)
            session.ehlo()
            replies = session.send(
                "MAIL FROM:<a@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            )
            assert reply_codes(replies)[-1] == "354"
            for piece in pieces(MiB, b"X-Filler: " + b"h" * 88 + b"\r\n"):  # 1 MiB of fields
                session.send(piece)
            session.send(b"\r\n")
            for piece in pieces(MiB, b"b" * 98 + b"\r\n"):  # and 1 MiB of body, so far
                session.send(piece)
            sessions.append(session)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < BUDGET + SLACK, f"{held / MiB:.1f} MiB held by {SESSIONS} sessions"
    # And each message is whole when it ends.
    for session in sessions[:2]:
        assert reply_codes(session.send(b".\r\n")) == ["250 2.0.0"]
    stored = inner.finished[0].data
    lines = len(list(pieces(MiB, b"."))) * (64 * 1024 // 100)
    assert stored.count(b"\r\nX-Filler: ") == lines and stored.count(b"b" * 98 + b"\r\n") == lines
