import shutil, tempfile
from pathlib import Path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.protocol.imap_harness import IMAPHarness
from tests.protocol.test_imap_fuzz import NAMES, prepared

ARGS = [b"INBOX", b"Trash", b"Sent", b"x", b"x/y", b'"a b"', b"NIL", b"()", b"(\\Seen)", b"1", b"2", b"1:*", b"*", b"*:1", b"1,2", b"3:2",
 b"UID", b"FLAGS", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY", b"BODY[]", b"BODY[TEXT]", b"BODY[1]", b"BODY[2]", b"BODY[1.1]", b"BODY[2.MIME]", b"BODY[1.HEADER]",
 b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]", b"BODY[]<0.5>", b"BODY[]<3.0>", b"RFC822.SIZE", b"INTERNALDATE", b"RFC822.HEADER", b"RFC822.TEXT", b"FAST", b"FULL", b"ALL",
 b"+FLAGS", b"-FLAGS.SILENT", b"FLAGS", b"(\\Deleted)", b"(kw1 kw2)", b"SEEN", b"UNSEEN", b"OR", b"NOT", b"(", b")", b"SUBJECT", b"one", b"LARGER", b"5",
 b"SINCE", b"1-Jan-2000", b"HEADER", b"From", b"TEXT", b"KEYWORD", b"$x", b"CHARSET", b"UTF-8", b"(MESSAGES UIDNEXT UNSEEN RECENT UIDVALIDITY)",
 b"\"\"", b"%", b"*", b"(SUBSCRIBED)", b"RETURN", b"(CHILDREN SPECIAL-USE)", b"{1+}\r\nA", b'"17-Jul-1996 02:44:25 -0700"', b"{4+}\r\nS: x"]
CMDS = ["SELECT", "EXAMINE", "FETCH", "UID FETCH", "STORE", "UID STORE", "SEARCH", "UID SEARCH", "COPY", "MOVE", "UID MOVE", "UID COPY", "EXPUNGE", "UID EXPUNGE",
 "CLOSE", "UNSELECT", "NOOP", "CHECK", "LIST", "LSUB", "STATUS", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "APPEND", "IDLE", "DONE"]

@st.composite
def command(draw):
    name = draw(st.sampled_from(CMDS)).encode()
    args = draw(st.lists(st.sampled_from(ARGS), max_size=5))
    return b" ".join([b"t", name, *args]) + b"\r\n"

@settings(max_examples=int(__import__("os").environ.get("N", "300")), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(command(), min_size=1, max_size=15), st.booleans())
def test_fuzz2(cmds, two):
    from twisted.logger import globalLogPublisher
    failures = []
    observer = lambda event: failures.append(event) if "log_failure" in event else None
    globalLogPublisher.addObserver(observer)
    root = Path(tempfile.mkdtemp())
    try:
        imap = prepared(root)
        other = IMAPHarness(root, store=imap.store, clock=imap.clock) if two else None
        imap.login(); imap.command("s SELECT INBOX")
        if other: other.login(); other.command("s SELECT INBOX")
        out = b""
        for i, c in enumerate(cmds):
            target = other if (other and i % 2) else imap
            if target.closed: continue
            out += target.send(c)
        imap.clock.advance(60)
        out += imap.read()
        assert b"Internal error" not in out, out
        assert b"SERVERBUG" not in out, out
        assert not failures, (cmds, [e["log_failure"].getTraceback() for e in failures])
    finally:
        globalLogPublisher.removeObserver(observer)
        shutil.rmtree(root, ignore_errors=True)
