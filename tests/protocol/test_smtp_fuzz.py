"""
Random bytes and random command sequences never crash the session, and
every reply line is well formed.
"""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.testing import LOOPBACK, REMOTE, SMTPHarness

REPLY_LINE = re.compile(rb"^\d{3}[ -]")

COMMANDS = st.sampled_from(
    [
        b"EHLO c", b"HELO c", b"MAIL FROM:<a@b.c>", b"MAIL FROM:<>", b"RCPT TO:<bob@example.org>",
        b"RCPT TO:<x@remote.net>", b"DATA", b"x", b".", b"..", b"", b"RSET", b"NOOP", b"VRFY bob",
        b"EXPN list", b"HELP", b"ETRN remote.net", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"*",
        b"AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=", b"BDAT 3", b"BDAT 0 LAST", b"BDAT 5 LAST", b"QUIT",
        b"MAIL FROM:<a@b.c> SIZE=99999999999", b"RCPT TO:<@x:y@z>", b"\x00\xff", b"TURN",
    ]
)
ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


def check(session: SMTPHarness, output: bytes) -> None:
    if not output:
        return
    assert output.endswith(b"\r\n")
    for line in output[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), line


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10), st.booleans())
def test_random_bytes(chunks, loopback):
    session = SMTPHarness(peer=LOOPBACK if loopback else REMOTE, tls_options=object())
    for chunk in chunks:
        if session.closed:
            break
        check(session, session.send(chunk))
    session.clock.advance(1000)
    check(session, session.read())
    session.lose()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(COMMANDS, ENDINGS), max_size=25), st.integers(1, 40))
def test_random_command_sequences(commands, split):
    session = SMTPHarness(peer=LOOPBACK, tls_options=object())
    stream = b"".join(command + ending for command, ending in commands)
    for start in range(0, len(stream), split):
        if session.closed:
            break
        check(session, session.send(stream[start : start + split]))
    check(session, session.send(b"\r\n.\r\nQUIT\r\n") if not session.closed else b"")
    session.lose()
    for message in session.intake.messages:
        assert not (message.finished and message.aborted)
