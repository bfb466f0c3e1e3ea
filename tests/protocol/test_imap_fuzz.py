"""
Hostile input to an IMAP session (hypothesis): random commands built from
IMAP's own pieces (tags, names, atoms, quoted strings, literals, lists,
sequence sets, brackets) and random bytes, in random chunks, in every
state.  Whatever arrives, the server answers (or closes after too many
errors) and never fails inside: no traceback, no "internal error".
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.imap_harness import IMAPHarness

NAMES = [
    "NOOP", "CAPABILITY", "LOGIN", "AUTHENTICATE", "SELECT", "EXAMINE", "CREATE", "DELETE",
    "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "CHECK", "CLOSE",
    "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID", "IDLE", "NAMESPACE", "ENABLE",
    "ID", "UNSELECT", "LOGOUT", "STARTTLS", "DONE", "BOGUS",
]
PIECES = [
    b"INBOX", b"Sent", b'"a b"', b'"\\""', b"NIL", b"()", b"(\\Seen $Junk)", b"1:*", b"*", b"1,3:5",
    b"0", b"4294967296", b"BODY[]", b"BODY.PEEK[HEADER.FIELDS (FROM)]<0.10>", b"BODY[1.2.MIME]",
    b"RFC822", b"ENVELOPE", b"BODYSTRUCTURE", b"(UID FLAGS)", b"+FLAGS", b"FLAGS.SILENT",
    b"ALL", b"OR", b"NOT", b"SINCE", b"1-Jan-2000", b"HEADER", b"TEXT", b"{3}", b"{3+}",
    b"{99999999}", b"[", b"]", b"(", b")", b"\\", b"%", b"&Jjo", b"a.b", b"Entw&APw-rfe",
    b"PLAIN", b"AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=", b"bob@example.org", b"secret", b"\xff",
]


@st.composite
def commands(draw) -> bytes:
    tag = draw(st.sampled_from([b"a", b"b1", b"*", b"+", b""]))
    name = draw(st.sampled_from(NAMES)).encode()
    args = draw(st.lists(st.sampled_from(PIECES), max_size=6))
    line = b" ".join([tag, name, *args])
    if line.endswith((b"{3}", b"{3+}")):
        line += b"\r\nxyz" + draw(st.sampled_from([b"", b" NIL", b" {1+}\r\nq"]))
    return line + draw(st.sampled_from([b"\r\n", b"\n"]))


inputs = st.lists(
    st.one_of(commands(), st.binary(max_size=40), st.just(b"DONE\r\n"), st.just(b"*\r\n")),
    min_size=1,
    max_size=12,
)


def prepared(root: Path) -> IMAPHarness:
    imap = IMAPHarness(root)
    imap.deliver("1000.M1P1Q1.h", b"Subject: one\n\nbody\n")
    imap.deliver(
        "1001.M1P1Q1.h",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\npart\n--b--\n",
    )
    return imap


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(["none", "login", "select"]),
    pieces=inputs,
    cut=st.integers(min_value=1, max_value=17),
)
def test_any_input_is_answered_without_failing(start, pieces, cut):
    root = Path(tempfile.mkdtemp())
    try:
        imap = prepared(root)
        if start != "none":
            imap.login()
        if start == "select":
            imap.command("s SELECT INBOX")
        data = b"".join(pieces)
        out = b""
        for offset in range(0, len(data), cut):
            out += imap.send(data[offset : offset + cut])
            if imap.closed:
                break
        imap.clock.advance(60)  # delayed answers (failed logins) come out
        out += imap.read()
        assert b"Internal error" not in out, out
        if b"\n" in data and not imap.closed and imap.protocol.session.state.reads_commands:
            assert out, data
    finally:
        shutil.rmtree(root, ignore_errors=True)
