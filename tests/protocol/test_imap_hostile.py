"""
What a hostile or broken client sends that the first IMAP tests did not
try: deeply nested lists and search keys, and the like.  Each gets its
RFC 3501 answer (BAD or NO) and the session goes on.
"""

import pytest

from tests.protocol.imap_harness import IMAPHarness, tagged


@pytest.fixture
def imap(tmp_path):
    harness = IMAPHarness(tmp_path)
    harness.deliver("1000.M1P1Q1.h", b"Subject: one\n\nbody\n")
    harness.select()
    return harness


@pytest.mark.parametrize(
    "line",
    [
        "a SEARCH " + "NOT " * 5000 + "ALL",
        "a SEARCH " + "OR ALL " * 5000 + "ALL",
        "a SEARCH " + "(" * 5000 + "ALL" + ")" * 5000,
        "a FETCH 1 " + "(" * 5000 + "FLAGS" + ")" * 5000,
        "a ID " + "(" * 5000 + ")" * 5000,
    ],
    ids=["not", "or", "parentheses", "fetch-lists", "id-lists"],
)
def test_deep_nesting_is_bad_and_the_session_goes_on(imap, line):
    assert tagged(imap.command(line), "a").startswith("a BAD Error in IMAP command")
    assert not imap.closed
    assert tagged(imap.command("b NOOP"), "b") == "b OK NOOP completed."


def test_nesting_a_client_may_use_still_works(imap):
    out = imap.command("a SEARCH " + "NOT " * 20 + "(((OR SEEN (NOT DELETED))))")
    assert b"* SEARCH 1\r\n" in out
    assert tagged(out, "a") == "a OK Search completed."


def test_a_large_literal_before_login_is_refused_before_it_is_sent(tmp_path):
    # An APPEND's message may be as large as limits.max_message_size, but
    # only once logged in: before that, no command needs more than a
    # command's 64 KiB, and "+ OK" would invite anyone to send megabytes.
    imap = IMAPHarness(tmp_path)
    out = imap.command("a APPEND INBOX {10000000}")
    assert b"+ " not in out
    assert tagged(out, "a") == "a NO [TOOBIG] Literal too large."
    imap.login()
    out = imap.command("b APPEND INBOX {100000}")
    assert out.startswith(b"+ ")


def test_a_large_nonsynchronizing_literal_before_login_is_not_kept(tmp_path):
    imap = IMAPHarness(tmp_path)
    out = imap.send(b"a APPEND INBOX {200000+}\r\n" + b"x" * 200000 + b"\r\n")
    assert tagged(out, "a") == "a NO [TOOBIG] Literal too large."
    assert tagged(imap.command("b NOOP"), "b") == "b OK NOOP completed."


FORWARDED = (
    b"Subject: outer\n"
    b"Content-Type: message/rfc822\n"
    b"\n"
    b"Subject: inner\n"
    b"Content-Type: multipart/mixed; boundary=b\n"
    b"\n"
    b"--b\n"
    b"\n"
    b"first\n"
    b"--b\n"
    b"\n"
    b"second\n"
    b"--b--\n"
)


def test_a_message_that_is_a_message_rfc822_has_it_as_part_one(tmp_path):
    # RFC 3501 6.4.5: a non-multipart message with an encapsulated message
    # has that message as its part 1 (header and body, as Dovecot and
    # Cyrus answer); 1.MIME is the outer header, 1.HEADER the inner one and
    # 1.1 the inner message's first part.
    imap = IMAPHarness(tmp_path)
    imap.deliver("1000.M1P1Q1.h", FORWARDED)
    imap.select()
    inner = FORWARDED.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    out = imap.command("a FETCH 1 (BODY.PEEK[1])")
    assert b"BODY[1] {%d}\r\n%s)" % (len(inner), inner) in out
    out = imap.command("b FETCH 1 (BODY.PEEK[1.MIME])")
    assert b"BODY[1.MIME] {48}\r\nSubject: outer\r\nContent-Type: message/rfc822\r\n\r\n)" in out
    out = imap.command("c FETCH 1 (BODY.PEEK[1.HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: inner\r\n\r\n)" in out
    out = imap.command("d FETCH 1 (BODY.PEEK[1.1] BODY.PEEK[1.2])")
    assert b"BODY[1.1] {5}\r\nfirst BODY[1.2] {6}\r\nsecond)" in out


def test_a_client_that_does_not_log_in_is_timed_out_after_three_minutes(tmp_path):
    # limits.imap_idle_timeout (30 minutes, RFC 3501 5.4) is for logged-in
    # sessions; strangers holding connections idle would fill the caps.
    imap = IMAPHarness(tmp_path)
    imap.clock.advance(179)
    assert not imap.closed
    imap.command("a CAPABILITY")
    imap.clock.advance(179)
    assert not imap.closed
    imap.clock.advance(2)
    assert imap.read() == b"* BYE Disconnected for inactivity.\r\n"
    assert imap.closed


def test_a_logged_in_client_keeps_limits_imap_idle_timeout(tmp_path):
    imap = IMAPHarness(tmp_path)
    assert tagged(imap.login(), "L").startswith("L OK")
    timeout = imap.config.limits.imap_idle_timeout
    imap.clock.advance(timeout - 1)
    assert not imap.closed
    imap.clock.advance(2)
    assert imap.closed


@pytest.mark.parametrize(
    "name",
    ["{5+}\r\na\nb\rc", "{3+}\r\nx\x00y", '"' + "z" * 3000 + '"', '"a/../b"', '"a//b"'],
    ids=["line-breaks", "nul", "long", "dots", "empty-level"],
)
def test_subscribe_takes_only_names_a_folder_could_have(imap, name):
    before = (imap.maildir / "subscriptions").read_bytes()
    out = imap.command(f"a SUBSCRIBE {name}")
    assert tagged(out, "a").startswith("a NO [CANNOT]")
    assert (imap.maildir / "subscriptions").read_bytes() == before
    assert tagged(imap.command('b SUBSCRIBE "Not/Yet/There"'), "b") == "b OK Subscribe completed."
    assert b'"Not/Yet/There"' in imap.command('c LSUB "" Not/*')


@pytest.mark.parametrize("filler", [0, 300 * 1024], ids=["small", "streamed"])
def test_nul_octets_in_a_message_go_out_as_0x80(tmp_path, filler):
    # RFC 3501 9: a literal's CHAR8 excludes NUL; as Dovecot does, a NUL
    # a message holds is sent as 0x80, so sizes and offsets stay.
    imap = IMAPHarness(tmp_path)
    data = b"Subject: a\x00b\nX-A: c\x00d\n\n" + b"x" * filler + b"e\x00f\n"
    imap.deliver("1000.M1P1Q1.h", data)
    imap.select()
    out = imap.command(
        "a FETCH 1 (RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT] BODY.PEEK[HEADER.FIELDS (X-A)] ENVELOPE)"
    )
    out += imap.read()
    assert tagged(out, "a") == "a OK Fetch completed."
    assert b"\x00" not in out
    wire = data.replace(b"\n", b"\r\n").replace(b"\x00", b"\x80")
    assert b"RFC822.SIZE %d BODY[] {%d}\r\n%s" % (len(wire), len(wire), wire) in out
    assert b"X-A: c\x80d\r\n\r\n" in out
    assert b"e\x80f\r\n BODY[HEADER.FIELDS (X-A)]" in out


def _two_sessions_on(tmp_path, folder: str):
    first = IMAPHarness(tmp_path)
    first.login()
    first.command(f"c CREATE {folder}")
    first.command(f"a APPEND {folder} {{5+}}\r\nhello")
    second = IMAPHarness(tmp_path, store=first.store, clock=first.clock)
    assert tagged(second.select(folder), "S").startswith("S OK")
    return first, second


@pytest.mark.parametrize("command", ["n NOOP", "n FETCH 1 (BODY.PEEK[])", "n STORE 1 +FLAGS (\\Seen)",
                                     "n EXPUNGE", "n UID SEARCH TEXT hello", "n COPY 1 INBOX"])
@pytest.mark.parametrize("how", ["DELETE Doomed", "RENAME Doomed Elsewhere"])
def test_a_session_whose_mailbox_another_deletes_hears_bye(tmp_path, command, how):
    # As Dovecot: "* BYE Selected mailbox was deleted" and the connection
    # closes; no traceback, no "internal error", the other session goes on.
    first, second = _two_sessions_on(tmp_path, "Doomed")
    assert tagged(first.command(f"d {how}"), "d").startswith("d OK")
    out = second.command(command)
    assert b"* BYE Selected mailbox was deleted, have to disconnect.\r\n" in out
    assert b"SERVERBUG" not in out and b"Internal error" not in out
    assert second.closed
    assert tagged(first.command("e NOOP"), "e") == "e OK NOOP completed."


def test_a_mailbox_removed_on_disk_is_bye_too(tmp_path):
    import shutil

    first, second = _two_sessions_on(tmp_path, "Doomed")
    shutil.rmtree(second.maildir / ".Doomed")
    out = second.command("n FETCH 1 (BODY.PEEK[])")
    out += second.command("o NOOP")
    assert b"* BYE Selected mailbox was deleted, have to disconnect.\r\n" in out
    assert second.closed


@pytest.mark.parametrize("command", ["COPY", "MOVE", "UID COPY", "UID MOVE"])
@pytest.mark.parametrize("name", ['""', '"a.b"', "INBOX/x", '"a//b"'])
def test_copy_to_a_name_no_folder_can_have_is_no_cannot(tmp_path, command, name):
    imap = IMAPHarness(tmp_path)
    imap.deliver("1000.M1P1Q1.h", b"Subject: one\n\nbody\n")
    imap.select()
    imap.command("c CREATE a/b")
    out = imap.command(f"a {command} 1 {name}")
    assert tagged(out, "a").startswith("a NO [CANNOT]")
    assert list((imap.maildir / ".a.b" / "cur").iterdir()) == []
    assert b"* 1 EXPUNGE" not in out


def test_idle_without_done_ends_at_limits_imap_idle_timeout(imap):
    # RFC 2177: clients renew IDLE within 29 minutes; the keepalives the
    # server sends meanwhile do not count as the client's.
    assert imap.command("i IDLE") == b"+ idling\r\n"
    timeout = imap.config.limits.imap_idle_timeout
    imap.clock.advance(timeout - 1)
    assert b"* OK Still here" in imap.read() and not imap.closed
    imap.clock.advance(2)
    assert b"* BYE Disconnected for inactivity.\r\n" in imap.read()
    assert imap.closed


def test_an_item_named_twice_in_a_fetch_is_answered_once(imap):
    # 64 KiB of "BODYSTRUCTURE " is 4,600 copies of a structure that may
    # be hundreds of KB (as Dovecot, each item is answered once).
    out = imap.command("a FETCH 1 (" + " ".join(["BODYSTRUCTURE", "UID", "BODY.PEEK[TEXT]"] * 1000) + ")")
    assert out.count(b"BODYSTRUCTURE (") == 1
    assert out.count(b"UID 1") == 1
    assert out.count(b"BODY[TEXT] {") == 1
    assert tagged(out, "a") == "a OK Fetch completed."
