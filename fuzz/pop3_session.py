"""
Fuzz one POP3 session: the fuzzer's bytes choose the mailbox, the client's
address, TLS, the line limit and how the input is split, then the rest is
sent as the client's stream.

The oracle is the property test's (tests/protocol/test_pop3_fuzz.py,
L{run_session}): no exception, no logged failure, one well-formed response
per complete line (checked against a model of RFC 1939) or a clean close,
multi-line responses dot-stuffed and terminated, and only the messages
marked with DELE removed, only at QUIT.

    .venv/bin/python fuzz/pop3_session.py -max_total_time=300 fuzz/corpus/pop3
"""

from __future__ import annotations

import sys

import atheris

import _common

with atheris.instrument_imports(include=["mailserver"]):
    import mailserver.pop3  # noqa: F401  (the session, its glue, responses, maildrop, transfer)
    import mailserver.sasl  # noqa: F401

from tests.protocol.test_pop3_fuzz import FIXED, LOGIN, run_session  # noqa: E402

LIMITS = [512, 513, 6000]
LOGINS = [b"", LOGIN, b"AUTH PLAIN AGJvYkBsb2NhbGhvc3QAc2VjcmV0\r\n"]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = fdp.ConsumeInt(1)
    chunk_sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    pauses = [0.5 * fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    messages = [
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)) for _ in range(fdp.ConsumeIntInRange(0, 3))
    ]
    stream = LOGINS[(flags >> 4) % 3] + fdp.ConsumeBytes(fdp.remaining_bytes())
    run_session(
        stream,
        chunk_sizes,
        pauses,
        messages,
        remote=bool(flags & 1),
        tls=bool(flags & 2),
        limit=LIMITS[(flags >> 2) % 3],
        idle=bool(flags & 0x40),
    )
    _common.collect_garbage()


def main() -> None:
    tokens = [t for t in FIXED if t] + [b"\r\n", b"STLS\r\n", b"RETR 1\r\n", b"TOP 1 0\r\n"]
    seeds = [
        b"\x00" + LOGIN + b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 1\r\nDELE 1\r\nRSET\r\nDELE 2\r\nQUIT\r\n",
        b"\x02CAPA\r\nSTLS\r\nUSER bob@localhost\r\nPASS secret\r\nQUIT\r\n",
        b"\x01AUTH LOGIN\r\nYm9iQGxvY2FsaG9zdA==\r\nc2VjcmV0\r\nLIST 1\r\nQUIT\r\n",
    ]
    atheris.Setup(_common.prepare(sys.argv, "pop3", tokens, seeds), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
