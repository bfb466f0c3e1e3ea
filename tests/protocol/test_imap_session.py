"""
The IMAP session over a StringTransport: greeting, capabilities, logins,
STARTTLS, the folder commands, SELECT, FETCH, STORE, SEARCH, COPY/MOVE,
EXPUNGE, APPEND with literals, IDLE, errors.
"""

import base64
import os
import re

import pytest

from mailserver.testing import LOOPBACK, REMOTE
from tests.protocol.imap_harness import IMAPHarness, tagged, untagged


@pytest.fixture
def imap(tmp_path):
    return IMAPHarness(tmp_path)


def test_greeting_shows_capabilities(imap):
    assert imap.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE")
    assert b"AUTH=PLAIN AUTH=LOGIN" in imap.greeting  # loopback
    assert imap.greeting.endswith(b"] mx.example.org IMAP4rev1 ready.\r\n")


def test_login_disabled_on_cleartext_non_loopback(tmp_path):
    imap = IMAPHarness(tmp_path, peer=REMOTE, tls_options=object())
    assert b"LOGINDISABLED" in imap.greeting
    assert b"STARTTLS" in imap.greeting
    assert b"AUTH=PLAIN" not in imap.greeting
    out = imap.command("a LOGIN bob@example.org secret")
    assert tagged(out, "a").startswith("a NO [PRIVACYREQUIRED]")
    out = imap.command("b AUTHENTICATE PLAIN")
    assert tagged(out, "b").startswith("b NO [PRIVACYREQUIRED]")
    out = imap.command("c STARTTLS")
    assert tagged(out, "c") == "c OK Begin TLS negotiation now."
    assert imap.transport.tls_started_with is not None
    caps = imap.command("d CAPABILITY")
    assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
    assert tagged(imap.login(), "L").startswith("L OK [CAPABILITY ")


def test_login_and_logout(imap):
    out = imap.login()
    assert tagged(out, "L").startswith("L OK [CAPABILITY IMAP4rev1")
    assert b"AUTH=" not in out
    out = imap.command("z LOGOUT")
    assert out == b"* BYE Logging out\r\nz OK Logout completed.\r\n"
    assert imap.closed


def test_bad_password_is_answered_late_and_counted(imap):
    out = imap.command("a LOGIN bob@example.org wrong")
    assert out == b""  # held back
    imap.clock.advance(1)
    assert tagged(imap.read(), "a") == "a NO [AUTHENTICATIONFAILED] Authentication failed."


def test_authenticate_plain_with_and_without_initial_response(imap):
    token = base64.b64encode(b"\0bob@example.org\0secret").decode()
    assert imap.command("a AUTHENTICATE PLAIN").startswith(b"+ ")
    assert tagged(imap.command(token), "a").startswith("a OK")
    other = IMAPHarness(imap.root)
    assert tagged(other.command(f"b AUTHENTICATE PLAIN {token}"), "b").startswith("b OK")


def test_authenticate_login_and_cancel(imap):
    assert imap.command("a AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert imap.command("*") == b"a BAD Authentication aborted by client.\r\n"
    assert imap.command("b AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert imap.command(base64.b64encode(b"bob@example.org").decode()) == b"+ UGFzc3dvcmQ6\r\n"
    assert tagged(imap.command(base64.b64encode(b"secret").decode()), "b").startswith("b OK")


def test_commands_out_of_state_and_unknown(imap):
    assert tagged(imap.command("a SELECT INBOX"), "a") == "a BAD SELECT is not valid in the not authenticated state."
    assert tagged(imap.command("b FROB"), "b") == "b BAD Unknown command."
    assert imap.command("c") == b"c BAD Error in IMAP command: Expected a space\r\n"
    assert imap.command("") == b"* BAD Error in IMAP command: Missing argument\r\n"


def test_parse_errors_say_bad_and_the_session_goes_on(imap):
    assert tagged(imap.command('a LOGIN "unterminated'), "a").startswith("a BAD Error in IMAP command")
    assert tagged(imap.command("b NOOP"), "b") == "b OK NOOP completed."


def test_too_many_errors_close(imap):
    for n in range(imap.config.limits.max_errors):
        out = imap.command(f"x{n} FROB")
    assert b"* BYE Too many invalid IMAP commands." in out
    assert imap.closed


def test_first_login_lists_special_use_folders(imap):
    imap.login()
    out = imap.command('a LIST "" "*"')
    assert untagged(out) == [
        'LIST (\\HasNoChildren) "/" "INBOX"',
        'LIST (\\HasNoChildren \\Drafts) "/" "Drafts"',
        'LIST (\\HasNoChildren \\Junk) "/" "Junk"',
        'LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        'LIST (\\HasNoChildren \\Trash) "/" "Trash"',
    ]
    out = imap.command('b LIST (SPECIAL-USE) "" "*"')
    assert [line.split()[-1] for line in untagged(out)] == ['"Drafts"', '"Junk"', '"Sent"', '"Trash"']
    assert untagged(imap.command('c LIST "" ""')) == ['LIST (\\Noselect) "/" ""']
    out = imap.command('d LSUB "" "*"')
    assert len(untagged(out)) == 5


def test_create_rename_delete_subscribe(imap):
    imap.login()
    assert tagged(imap.command("a CREATE Work/2024"), "a") == "a OK Create completed."
    assert tagged(imap.command("b CREATE Work"), "b").startswith("b NO [ALREADYEXISTS]")
    assert tagged(imap.command('c CREATE "bad.name"'), "c").startswith("c NO [CANNOT]")
    out = imap.command('d LIST "" "Work/%"')
    assert untagged(out) == ['LIST (\\HasNoChildren) "/" "Work/2024"']
    assert tagged(imap.command("e RENAME Work Jobs"), "e") == "e OK Rename completed."
    out = imap.command('f LIST "" "*"')
    assert 'LIST (\\HasChildren) "/" "Jobs"' in untagged(out)
    assert tagged(imap.command("g SUBSCRIBE Jobs"), "g") == "g OK Subscribe completed."
    assert 'LSUB () "/" "Jobs"' in untagged(imap.command('h LSUB "" "Jobs"'))
    assert tagged(imap.command("i DELETE Jobs/2024"), "i") == "i OK Delete completed."
    assert tagged(imap.command("j DELETE Nothing"), "j").startswith("j NO [NONEXISTENT]")
    out = imap.command('k LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN)')
    assert 'LIST (\\HasNoChildren \\Subscribed) "/" "Jobs"' in untagged(out)


def test_non_ascii_names_are_modified_utf7(imap):
    imap.login()
    assert tagged(imap.command("a CREATE Entw&APw-rfe"), "a") == "a OK Create completed."
    assert (imap.maildir / ".Entw&APw-rfe").is_dir()
    assert 'LIST (\\HasNoChildren) "/" "Entw&APw-rfe"' in untagged(imap.command('b LIST "" "E*"'))


def test_select_reports_the_folder(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.deliver("1001.M1P1Q1.h")
    out = imap.select()
    lines = untagged(out)
    assert lines[0] == "FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
    assert lines[1] == "OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted."
    assert lines[2:5] == ["2 EXISTS", "2 RECENT", "OK [UNSEEN 1] First unseen."]
    assert re.match(r"OK \[UIDVALIDITY \d+\] UIDs valid", lines[5])
    assert lines[6] == "OK [UIDNEXT 3] Predicted next UID"
    assert tagged(out, "S") == "S OK [READ-WRITE] Select completed."
    # The recent messages are this session's: another sees none recent.
    other = IMAPHarness(imap.root, store=imap.store)
    other.login()
    assert "0 RECENT" in untagged(other.command("e EXAMINE INBOX"))


def test_select_missing_folder(imap):
    imap.login()
    assert tagged(imap.command("a SELECT Nothing"), "a").startswith("a NO [NONEXISTENT]")
    assert tagged(imap.command("b FETCH 1 UID"), "b").startswith("b BAD")


def test_fetch_items(imap):
    data = b"From: Bob <bob@example.org>\nSubject: hi\nDate: Mon, 7 Feb 1994 21:52:25 -0800\n\nline 1\nline 2\n"
    imap.deliver("1000.M1P1Q1.h", data)
    imap.select()
    wire = data.replace(b"\n", b"\r\n")
    out = imap.command("a FETCH 1 (UID RFC822.SIZE FLAGS BODY.PEEK[])")
    assert out.startswith(b"* 1 FETCH (UID 1 RFC822.SIZE %d FLAGS (\\Recent) BODY[] {%d}\r\n" % (len(wire), len(wire)))
    assert wire + b")\r\n" in out
    assert tagged(out, "a") == "a OK Fetch completed."
    out = imap.command("b FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)] BODY[TEXT]<2.4> ENVELOPE)")
    assert b'BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: hi\r\n\r\n' in out
    assert b"BODY[TEXT]<2> {4}\r\nne 1" in out
    assert b'ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "hi" (("Bob" NIL "bob" "example.org"))' in out
    # BODY[] without PEEK sets \Seen, and says so.
    assert b"FLAGS (\\Seen \\Recent)" in out
    assert b"FLAGS" not in imap.command("c FETCH 1 BODY[TEXT]")
    assert list((imap.maildir / "cur").iterdir())[0].name.endswith(":2,S")


def test_uid_fetch_of_uids_that_do_not_exist_is_empty(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.select()
    out = imap.command("a UID FETCH 5:7 FLAGS")
    assert out == b"a OK Fetch completed.\r\n"
    assert tagged(imap.command("b FETCH 5 FLAGS"), "b").startswith("b BAD")


def test_store_and_flags(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.select()
    out = imap.command("a STORE 1 +FLAGS (\\Seen $Junk)")
    assert untagged(out) == [
        "FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Junk)",
        "OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Junk \\*)] Flags permitted.",
        "1 FETCH (FLAGS (\\Seen $Junk \\Recent))",
    ]
    out = imap.command("b UID STORE 1 -FLAGS.SILENT (\\Seen)")
    assert out == b"b OK Store completed.\r\n"
    out = imap.command("c FETCH 1 FLAGS")
    assert untagged(out) == ["1 FETCH (FLAGS ($Junk \\Recent))"]


def test_a_flag_change_reaches_another_session(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.select()
    other = IMAPHarness(imap.root, store=imap.store)
    other.select()
    imap.command("a STORE 1 +FLAGS (\\Seen)")
    out = other.command("b NOOP")
    assert untagged(out) == ["1 FETCH (UID 1 FLAGS (\\Seen))"]


def test_search(imap):
    imap.deliver("1000.M1P1Q1.h", b"From: bob@example.org\nSubject: Hello there\n\nfirst body\n")
    imap.deliver("1001.M1P1Q1.h", b"From: alice@example.org\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n\nsecond\n")
    imap.select()
    imap.command("x STORE 2 +FLAGS (\\Seen)")
    assert untagged(imap.command("a SEARCH ALL")) == ["SEARCH 1 2"]
    assert untagged(imap.command("b SEARCH UNSEEN")) == ["SEARCH 1"]
    assert untagged(imap.command("c SEARCH FROM alice")) == ["SEARCH 2"]
    assert untagged(imap.command('d SEARCH CHARSET UTF-8 SUBJECT "grüße"')) == ["SEARCH 2"]
    assert untagged(imap.command('e SEARCH SUBJECT "hello"')) == ["SEARCH 1"]
    assert untagged(imap.command("f SEARCH BODY second")) == ["SEARCH 2"]
    assert untagged(imap.command("g UID SEARCH OR SEEN TEXT first")) == ["SEARCH 1 2"]
    assert untagged(imap.command("h SEARCH NOT 1")) == ["SEARCH 2"]
    assert untagged(imap.command("i SEARCH LARGER 60")) == ["SEARCH 2"]
    assert untagged(imap.command("j SEARCH SINCE 1-Jan-2000")) == ["SEARCH 1 2"]
    assert untagged(imap.command("k SEARCH BEFORE 1-Jan-2000")) == ["SEARCH"]
    assert tagged(imap.command("l SEARCH CHARSET KOI8-R ALL"), "l").startswith("l NO [BADCHARSET")


def test_copy_move_expunge_with_uidplus(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.deliver("1001.M1P1Q1.h")
    imap.deliver("1002.M1P1Q1.h")
    imap.select()
    out = imap.command("a COPY 1:2 Sent")
    assert re.match(r"a OK \[COPYUID \d+ 1:2 1:2\] Copy completed.", tagged(out, "a"))
    out = imap.command("b UID MOVE 2 Trash")
    lines = untagged(out)
    assert re.match(r"OK \[COPYUID \d+ 2 1\] Moved UIDs.", lines[0])
    assert lines[1] == "2 EXPUNGE"
    assert tagged(out, "b") == "b OK Move completed."
    imap.command("c STORE 1 +FLAGS (\\Deleted)")
    out = imap.command("d EXPUNGE")
    assert untagged(out) == ["1 EXPUNGE"]
    assert untagged(imap.command("e FETCH 1:* UID")) == ["1 FETCH (UID 3)"]
    assert tagged(imap.command("f COPY 1 Nowhere"), "f").startswith("f NO [TRYCREATE]")


def test_expunge_by_another_session_waits_for_a_command_that_may_renumber(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.deliver("1001.M1P1Q1.h")
    imap.select()
    other = IMAPHarness(imap.root, store=imap.store)
    other.select()
    other.command("a STORE 1 +FLAGS (\\Deleted)")
    other.command("b EXPUNGE")
    out = imap.command("c FETCH 2 UID")  # no EXPUNGE during FETCH
    assert "1 EXPUNGE" not in untagged(out) and "2 FETCH (UID 2)" in untagged(out)
    out = imap.command("d NOOP")
    assert "1 EXPUNGE" in untagged(out)


def test_append_with_literals_and_appenduid(imap):
    imap.login()
    message = b"Subject: appended\r\n\r\nhello\r\n"
    out = imap.command(f"a APPEND Sent (\\Seen) {{{len(message)}}}")
    assert out == b"+ OK\r\n"
    out = imap.send(message + b"\r\n")
    assert re.match(r"a OK \[APPENDUID \d+ 1\] Append completed.", tagged(out, "a"))
    (name,) = [p.name for p in (imap.maildir / ".Sent" / "cur").iterdir()]
    assert name.endswith(":2,S")
    assert (imap.maildir / ".Sent" / "cur" / name).read_bytes() == message.replace(b"\r\n", b"\n")
    # LITERAL+: no continuation, the message follows at once.
    out = imap.send(b"b APPEND INBOX {%d+}\r\n%s\r\n" % (len(message), message))
    assert re.match(r"b OK \[APPENDUID \d+ 1\] Append completed.", tagged(out, "b"))
    assert tagged(imap.send(b"c APPEND Nowhere {1+}\r\nx\r\n"), "c").startswith("c NO [TRYCREATE]")


def test_a_large_literal_elsewhere_than_append_is_refused(imap):
    imap.login()
    out = imap.command("a LOGIN {100000}")
    assert tagged(out, "a").startswith("a NO [TOOBIG]")
    # A LITERAL+ one is read and thrown away, then refused.
    out = imap.send(b"b LOGIN {100000+}\r\n" + b"x" * 100000 + b" y\r\n")
    assert tagged(out, "b").startswith("b NO [TOOBIG]")
    assert tagged(imap.command("c NOOP"), "c") == "c OK NOOP completed."


def test_idle_pushes_new_mail(imap):
    imap.select()
    out = imap.command("i IDLE")
    assert out == b"+ idling\r\n"
    imap.deliver("1000.M1P1Q1.h")
    folder = imap.protocol.session.view.folder
    folder.refresh()
    assert imap.read() == b"* 1 EXISTS\r\n* 0 RECENT\r\n"
    imap.clock.advance(120)
    assert imap.read() == b"* OK Still here\r\n"
    out = imap.command("DONE")
    assert untagged(out) == ["1 RECENT"]
    assert tagged(out, "i") == "i OK Idle completed."


def test_idle_ends_with_bad_on_anything_but_done(imap):
    imap.login()
    imap.command("i IDLE")
    assert imap.command("NOOP") == b"i BAD Expected DONE.\r\n"


def test_status(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.login()
    out = imap.command("a STATUS INBOX (MESSAGES RECENT UIDNEXT UNSEEN)")
    assert untagged(out) == ['STATUS "INBOX" (MESSAGES 1 RECENT 1 UIDNEXT 2 UNSEEN 1)']


def test_close_expunges_silently_and_unselect_does_not(imap):
    imap.deliver("1000.M1P1Q1.h")
    imap.deliver("1001.M1P1Q1.h")
    imap.select()
    imap.command("a STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    assert imap.command("b UNSELECT") == b"b OK Unselect completed.\r\n"
    imap.command("c SELECT INBOX")
    assert imap.command("d CLOSE") == b"d OK Close completed.\r\n"
    assert list((imap.maildir / "cur").iterdir()) == []


def test_namespace_id_enable(imap):
    imap.login()
    assert untagged(imap.command("a NAMESPACE")) == ['NAMESPACE (("" "/")) NIL NIL']
    assert untagged(imap.command("b ID NIL")) == ['ID ("name" "mailserver")']
    assert untagged(imap.command("c ENABLE CONDSTORE")) == ["ENABLED"]


def test_pipelined_commands_are_answered_in_one_write(imap):
    imap.login()
    imap.transport.clear()
    writes = []
    real = imap.transport.write
    imap.transport.write = lambda data: (writes.append(data), real(data))
    imap.send(b"a NOOP\r\nb NOOP\r\nc NOOP\r\n")
    assert writes == [b"a OK NOOP completed.\r\nb OK NOOP completed.\r\nc OK NOOP completed.\r\n"]


def test_loopback_peer_is_allowed_plaintext(tmp_path):
    assert b"LOGINDISABLED" not in IMAPHarness(tmp_path, peer=LOOPBACK).greeting


def test_failed_logins_share_the_throttle_with_smtp(tmp_path):
    """
    The server gives every listener one LoginThrottle: failures over SMTP
    count against the next IMAP login from the same address.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailserver.login_throttle import LoginThrottle
    from mailserver.smtp import SMTPDependencies, SMTPFactory
    from mailserver.testing import FakeAccounts, MemoryIntake, SMTPHarness, make_config, make_portal

    clock = MemoryReactorClock()
    throttle = LoginThrottle(clock, delay=0.0, limit=2, window=900)
    config = make_config(smtp={"auth_over_plaintext": True})
    smtp = SMTPHarness(factory=SMTPFactory(SMTPDependencies.for_listener(
        role="submission",
        hostname=config.hostname,
        smtp=config.smtp,
        limits=config.limits,
        accounts=FakeAccounts(config, ["bob@example.org"]),
        portal=make_portal(**{"bob@example.org": "secret"}),
        intake=MemoryIntake(),
        tls_options=None,
        reactor=clock,
        login_throttle=throttle,
    )), peer=REMOTE)
    smtp.ehlo()
    for _ in range(2):
        smtp.login(password="wrong")
        clock.advance(0)
    imap = IMAPHarness(tmp_path, peer=REMOTE, implicit_tls=True, clock=clock, login_throttle=throttle)
    out = imap.command("a LOGIN bob@example.org secret")
    assert tagged(out, "a") == (
        "a NO [UNAVAILABLE] Too many failed logins from your address, try again later."
    )


def test_overlapping_ranges_name_each_message_once(imap):
    for n in range(4):
        imap.deliver(f"100{n}.M1P1Q1.h")
    imap.select()
    out = imap.command("a UID FETCH 3:4,1:3,2 UID")
    assert untagged(out) == [f"{n} FETCH (UID {n})" for n in (1, 2, 3, 4)]
    out = imap.command("b FETCH 4,2:3,1:2 UID")
    assert untagged(out) == [f"{n} FETCH (UID {n})" for n in (1, 2, 3, 4)]


def test_a_link_in_a_folder_is_refused_with_one_log_line_and_the_session_goes_on(imap, tmp_path):
    """
    A symbolic link planted for a folder's C{new/} is not followed: the
    command gets NO [SERVERBUG], the log line names the link (no
    traceback: it is a storage fault, not a bug), and the session goes on.
    """
    from twisted.logger import globalLogPublisher

    outside = tmp_path / "outside"
    outside.mkdir()
    imap.login()
    sent = imap.maildir / ".Sent"
    (sent / "new").rmdir()
    (sent / "new").symlink_to(outside)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        out = imap.command("a SELECT Sent")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert tagged(out, "a").startswith("a NO [SERVERBUG] ")
    failures = [e for e in events if e.get("log_level").name in ("error", "critical")]
    assert len(failures) == 1 and "log_failure" not in failures[0], failures
    assert str(sent / "new") in str(failures[0].get("error"))
    assert tagged(imap.command("b SELECT INBOX"), "b").startswith("b OK [READ-WRITE]")
    assert list(outside.iterdir()) == []


def test_a_linked_message_file_is_not_fetched(imap, tmp_path):
    """
    A link planted in new/ for a message is not read: FETCH leaves it out
    as gone (RFC 5530 EXPUNGEISSUED) and the session goes on.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: not mail\n\nsecret\n")
    imap.login()
    os.symlink(secret, imap.maildir / "new" / "1700000000.M1P1Q1.h,S=26,W=29")
    imap.deliver("1700000001.M1P1Q1.h")
    imap.command("s SELECT INBOX")
    out = imap.command("a UID FETCH 1:* BODY.PEEK[]")
    assert b"secret" not in out
    assert [line.split(" (")[0] for line in untagged(out)] == ["2 FETCH"]
    assert tagged(out, "a") == "a NO [EXPUNGEISSUED] Some of the requested messages no longer exist."
    assert tagged(imap.command("b NOOP"), "b") == "b OK NOOP completed."
