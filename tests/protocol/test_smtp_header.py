"""
What the SMTP server puts in front of a message: its Received field, never
merged with the message's first line (an empty line after it when the
message does not start with a header field, as Postfix puts one), and on
submission the Date and Message-ID fields a message lacks (RFC 6409 8.2,
8.3).  Bare line ends in BDAT chunks.
"""

import pytest

from mailserver.testing import LOOPBACK, SMTPHarness, make_config, reply_codes

DATE = b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n"


def sent(text: bytes, *, role: str = "smtp", pieces: int = 1) -> tuple[bytes, str]:
    """
    The stored message after our Received field, and its ID.
    """
    session = SMTPHarness(role=role, peer=LOOPBACK)
    session.ehlo()
    if role == "submission":
        assert reply_codes(session.login()) == ["235 2.7.0"]
    sender = "bob@example.org" if role == "submission" else "a@remote.net"
    session.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    step = max(1, len(text) // pieces)
    out = b"".join(session.send(text[i : i + step]) for i in range(0, len(text), step))
    out += session.send(b".\r\n")
    assert reply_codes(out) == ["250 2.0.0"], out
    (message,) = session.intake.finished
    return message.body, message.envelope.id


@pytest.mark.parametrize("pieces", [1, 3, 40])
@pytest.mark.parametrize("text", [
    b"Subject: hi\r\n\r\nbody\r\n",
    b"Subject : obsolete syntax\r\n\r\nbody\r\n",
    b"X-Odd!#$%&'*+-/=?^_`{|}~: all printable but the colon\r\n\r\nbody\r\n",
    b"\r\nbody without a header section\r\n",
    b"",
])
def test_a_message_that_starts_with_a_field_or_no_header_is_left_alone(text, pieces):
    assert sent(text, pieces=pieces)[0] == text


@pytest.mark.parametrize("pieces", [1, 3, 40])
@pytest.mark.parametrize("text", [
    b"   indented: would continue our Received field\r\nSubject: x\r\n\r\nbody\r\n",
    b"\tSubject: x\r\n\r\nbody\r\n",
    b"Just some text, no header at all\r\n",
    b"no colon here\r\n",
    b"Bad name\x01: x\r\n\r\n",
])
def test_an_empty_line_follows_our_field_when_the_message_starts_otherwise(text, pieces):
    assert sent(text, pieces=pieces)[0] == b"\r\n" + text


@pytest.mark.parametrize("line", [b"From someone@example.net Mon Jan  1 00:00:00 2024",
                                  b">From MAILER-DAEMON Fri Apr 06 16:46:09 2001"])
def test_a_unix_from_line_becomes_a_field_of_its_own(line):
    text = line + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert sent(text, pieces=4)[0] == b"X-Mailbox-Line: " + text
    body, message_id = sent(text, role="submission")
    assert body == (b"X-Mailbox-Line: " + line + b"\r\nSubject: x\r\n" + DATE + b"Message-ID: <"
                    + message_id.encode() + b"@mx.example.org>\r\n\r\nbody\r\n")


def test_a_first_line_without_a_field_in_bdat_without_any_line_end():
    session = SMTPHarness()
    session.ehlo()
    session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    assert reply_codes(session.send(b"BDAT 2\r\n  BDAT 3 LAST\r\nabc")) == ["250 2.0.0"] * 2
    assert session.intake.finished[0].body == b"\r\n  abc"


def test_submission_adds_date_and_message_id_at_the_end_of_the_header():
    body, message_id = sent(b"From: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n",
                            role="submission", pieces=5)
    assert body == (b"From: bob@example.org\r\nSubject: hi\r\n" + DATE
                    + b"Message-ID: <" + message_id.encode() + b"@mx.example.org>\r\n"
                    + b"\r\nbody\r\n")


def test_submission_keeps_the_fields_a_message_has():
    text = (b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMESSAGE-ID : <own@client>\r\n"
            b"Subject: x\r\n\r\nDate: in the body does not count\r\n")
    assert sent(text, role="submission")[0] == text
    body, message_id = sent(b"Subject: x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n",
                            role="submission")
    assert body == (b"Subject: x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                    b"Message-ID: <" + message_id.encode() + b"@mx.example.org>\r\n\r\nb\r\n")


def test_submission_without_a_header_section_gets_one_of_our_fields():
    body, message_id = sent(b"just text\r\n", role="submission")
    added = DATE + b"Message-ID: <" + message_id.encode() + b"@mx.example.org>\r\n"
    assert body == added + b"\r\njust text\r\n"
    body, message_id = sent(b"", role="submission")
    assert body == DATE + b"Message-ID: <" + message_id.encode() + b"@mx.example.org>\r\n"


def test_the_mx_role_adds_nothing():
    text = b"Subject: no date, no id\r\n\r\nbody\r\n"
    assert sent(text)[0] == text


def test_bdat_chunks_with_bare_line_ends_and_a_cr_split_between_chunks():
    session = SMTPHarness()
    session.ehlo()
    session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    first = b"S: x\n\nline\r"
    last = b"\nnext\rend\r"
    out = session.send(b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(last) + last)
    assert reply_codes(out) == ["250 2.0.0"] * 2
    assert session.intake.finished[0].body == b"S: x\r\n\r\nline\r\nnext end "


def test_bdat_with_bare_line_ends_is_refused_when_they_are():
    session = SMTPHarness(config=make_config(smtp={"bare_newline": "reject"}))
    session.ehlo()
    session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    assert reply_codes(session.send(b"BDAT 8 LAST\r\nS: x\n\nb\n")) == ["550 5.5.2"]
    assert session.intake.messages[0].aborted


@pytest.mark.parametrize("pieces", [2, 7, 29, 10_000])
@pytest.mark.parametrize("lf", [False, True])
def test_submission_finds_the_end_of_the_header_however_it_is_cut(pieces, lf):
    """
    The header section's end is tracked as it passes (only its last line
    kept), wherever the pieces are cut; bare LFs are line ends there too.
    """
    text = (b"From: bob@example.org\r\nTo: alice@example.org\r\n"
            b"Subject: a subject long enough to be cut in the middle\r\n"
            b"X-Folded: one\r\n\ttwo\r\n\r\nbody\r\nDate: not a field here\r\n")
    head, rest = text.split(b"\r\n\r\n", 1)
    # (The text must still end with CRLF for <CRLF>.<CRLF> to end it.)
    given = head.replace(b"\r\n", b"\n") + b"\n\n" + rest if lf else text
    body, message_id = sent(given, role="submission", pieces=pieces)
    assert body == (head + b"\r\n" + DATE + b"Message-ID: <" + message_id.encode()
                    + b"@mx.example.org>\r\n\r\n" + rest)
