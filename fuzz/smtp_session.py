"""
Fuzz one SMTP session: the fuzzer's bytes choose the client's address, the
role (MX or submission) and how the input is split, then the rest is sent
as the client's stream.

A crash is: an exception out of the protocol, a logged failure, a reply
line that is not C{NNN SP/-} text ended by CRLF (or holds a bare CR or LF),
a multi-line reply whose lines disagree on the code, a session still open
once every timeout has passed, or a message left neither finished nor
aborted when the connection is gone.

    .venv/bin/python fuzz/smtp_session.py -max_total_time=300 fuzz/corpus/smtp
"""

from __future__ import annotations

import re
import sys

import atheris

import _common

with atheris.instrument_imports(include=["mailserver"]):
    import mailserver.smtp  # noqa: F401  (session, transaction, glue, grammar, policy, wire room)
    import mailserver.sasl  # noqa: F401

from mailserver.testing import LOOPBACK, REMOTE, SMTPHarness  # noqa: E402
from tests.protocol.test_smtp_fuzz import COMMANDS  # noqa: E402

REPLY_LINE = re.compile(rb"^(\d{3})([ -])[^\r\n]*$")


class BadReply(Exception):
    pass


def check_replies(output: bytes, pending: list[bytes]) -> None:
    """
    Well-formed reply lines; C{pending} carries the codes of a multi-line
    reply across reads.
    """
    if not output:
        return
    if not output.endswith(b"\r\n"):
        raise BadReply(f"reply not ended by CRLF: {output[-80:]!r}")
    for line in output[:-2].split(b"\r\n"):
        match = REPLY_LINE.match(line)
        if not match:
            raise BadReply(f"malformed reply line {line[:200]!r}")
        code, separator = match.groups()
        if pending and pending[0] != code:
            raise BadReply(f"multi-line reply changes code: {pending[0]!r} then {line[:80]!r}")
        if separator == b"-":
            pending[:] = [code]
        else:
            pending.clear()


def run(data: bytes, chunk_sizes: list[int], loopback: bool, role: str, pause: float) -> None:
    with _common.FailureLog() as failures:
        session = SMTPHarness(role=role, peer=LOOPBACK if loopback else REMOTE, tls_options=object())
        pending: list[bytes] = []
        check_replies(session.greeting, pending)
        position = chunk = 0
        while position < len(data) and not session.closed:
            size = chunk_sizes[chunk % len(chunk_sizes)] if chunk_sizes else len(data)
            session.protocol.dataReceived(data[position : position + size])
            position += size
            chunk += 1
            if pause:
                session.clock.advance(pause)
            check_replies(session.read(), pending)
        for _ in range(4):  # tarpit pauses, then the command and data timeouts
            session.clock.advance(1000)
        check_replies(session.read(), pending)
        if pending:
            raise BadReply("multi-line reply never finished")
        if not session.closed:
            raise BadReply("session still open after every timeout")
        session.lose()
        _common.collect_garbage()  # a Deferred that failed unhandled logs now
        failures.check()
    for message in session.intake.messages:
        if message.finished == message.aborted:
            raise BadReply(f"message finished={message.finished} aborted={message.aborted}")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = fdp.ConsumeInt(1)
    chunk_sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    run(
        fdp.ConsumeBytes(fdp.remaining_bytes()),
        chunk_sizes,
        loopback=bool(flags & 1),
        role="submission" if flags & 2 else "smtp",
        pause=[0, 0, 0.5, 5][(flags >> 2) % 4],
    )


def main() -> None:
    tokens = [t for t in COMMANDS.elements if t] + [
        b"\r\n", b"\r\n.\r\n", b"MAIL FROM:<", b"RCPT TO:<", b">", b" BODY=8BITMIME", b" SMTPUTF8",
        b" SIZE=", b" RET=HDRS", b" NOTIFY=SUCCESS,DELAY", b" ORCPT=rfc822;", b" ENVID=",
        b"AUTH PLAIN AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=", b"@example.org",
    ]
    seeds = [
        b"\x01\x00EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        b"\x03\x00EHLO c\r\nAUTH PLAIN AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=\r\n"
        b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<x@remote.net>\r\nBDAT 5 LAST\r\nhello"
        b"QUIT\r\n",
        b"\x00\x00EHLO c\r\nSTARTTLS\r\nEHLO c\r\nVRFY bob\r\nEXPN list\r\nHELP\r\nRSET\r\nQUIT\r\n",
    ]
    atheris.Setup(_common.prepare(sys.argv, "smtp", tokens, seeds), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
