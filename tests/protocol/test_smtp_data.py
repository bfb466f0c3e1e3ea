"""
Message text: DATA framing and dot-stuffing, SMTP smuggling, size, line
length, loops, BDAT/CHUNKING, DSN and SMTPUTF8 envelopes, the Received field.
"""

import random

import pytest

from mailserver.testing import LOOPBACK, SMTPHarness, make_config, reply_codes


def in_data(**kwargs) -> SMTPHarness:
    session = SMTPHarness(**kwargs)
    session.ehlo()
    out = session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert reply_codes(out)[-1] == "354"
    return session


def test_dot_stuffing_is_undone_including_the_first_line():
    session = in_data()
    assert reply_codes(session.send("..first\r\nmiddle\r\n..\r\n...x\r\n.\r\n")) == ["250 2.0.0"]
    # No header field first: an empty line after our Received field.
    assert session.intake.finished[0].body == b"\r\n.first\r\nmiddle\r\n.\r\n..x\r\n"


def test_empty_message():
    session = in_data()
    assert reply_codes(session.send(".\r\n")) == ["250 2.0.0"]
    assert session.intake.finished[0].body == b""


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_terminator_and_stuffing_split_across_reads(size):
    session = in_data()
    data = b"Subject: s\r\n\r\n..a\r\nb\r\n.\r\nNOOP\r\n"
    out = b"".join(session.send(data[i : i + size]) for i in range(0, len(data), size))
    assert reply_codes(out) == ["250 2.0.0", "250 2.0.0"]
    assert session.intake.finished[0].body == b"Subject: s\r\n\r\n.a\r\nb\r\n"


def test_message_streams_in_pieces_not_held_whole():
    session = in_data()
    for _ in range(50):
        session.send(b"x" * 70 + b"\r\n" * 1)
    stored = session.intake.messages[0]
    assert len(stored.pieces) > 10 and not stored.finished
    session.send(".\r\n")
    assert stored.finished


def test_pipelined_commands_after_the_terminator_are_answered():
    session = in_data()
    out = session.send("hi\r\n.\r\nMAIL FROM:<a@b.c>\r\nRSET\r\n")
    assert reply_codes(out) == ["250 2.0.0", "250 2.1.0", "250 2.0.0"]


SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r",
]


SMUGGLED = b"MAIL FROM:<evil@remote.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nspoof\r\n"


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_sequences_never_end_data(sequence):
    """
    With bare newlines refused (C{smtp.bare_newline = "reject"}): the
    message is refused at the real end.
    """
    session = in_data(config=make_config(smtp={"bare_newline": "reject"}))
    out = session.send(b"Subject: a\r\n\r\nhello" + sequence + SMUGGLED)
    assert out == b""
    out = session.send(b".\r\n")
    assert reply_codes(out) == ["550 5.5.2"]
    (message,) = session.intake.messages
    assert message.aborted and not message.finished
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


@pytest.mark.parametrize("sequence", SMUGGLING)
def test_smuggling_sequences_are_content_when_normalized(sequence):
    """
    By default (as Postfix 3.9's C{normalize}): one message, which holds the
    would-be commands as text, every line ending in CRLF.
    """
    session = in_data()
    out = session.send(b"Subject: a\r\n\r\nhello" + sequence + SMUGGLED)
    assert out == b""
    assert reply_codes(session.send(b".\r\n")) == ["250 2.0.0"]
    (message,) = session.intake.messages
    assert message.finished
    expected = sequence.replace(b"\r\n", b"\n").replace(b"\r", b" ").replace(b"\n", b"\r\n")
    assert message.body == b"Subject: a\r\n\r\nhello" + expected + SMUGGLED
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


BARE = [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\n", b"end\r", b"a\n\rb\r\n", b"\r\r\n\n"]


@pytest.mark.parametrize("bare", BARE)
def test_bare_cr_or_lf_is_refused_at_the_real_end(bare):
    session = in_data(config=make_config(smtp={"bare_newline": "reject"}))
    assert reply_codes(session.send(b"x\r\n" + bare + b"\r\n.\r\n")) == ["550 5.5.2"]
    assert session.intake.messages[0].aborted


# Each of BARE followed by CRLF, as stored.
NORMALIZED = [
    b"a\r\nb\r\n\r\n", b"a b\r\n\r\n", b"a \r\n\r\n", b"\r\n\r\n", b"end \r\n",
    b"a\r\n b\r\n\r\n", b" \r\n\r\n\r\n",
]


@pytest.mark.parametrize("bare, stored", list(zip(BARE, NORMALIZED)))
def test_bare_lf_ends_a_line_and_bare_cr_is_a_space(bare, stored):
    session = in_data()
    assert reply_codes(session.send(b"S: x\r\n\r\n" + bare + b"\r\n.\r\n")) == ["250 2.0.0"]
    assert session.intake.finished[0].body == b"S: x\r\n\r\n" + stored


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_a_message_of_lf_line_ends_split_anywhere(size):
    """
    What C{smtplib.sendmail(msg.as_bytes())} sends: LF line ends, its own
    dot-stuffing after them, and the CRLF.CRLF end.
    """
    session = in_data()
    data = b"Subject: s\n\n..dot\nx\n.\nstill text\n\r\n.\r\nNOOP\r\n"
    out = b"".join(session.send(data[i : i + size]) for i in range(0, len(data), size))
    assert reply_codes(out) == ["250 2.0.0", "250 2.0.0"]
    assert session.intake.finished[0].body == (
        b"Subject: s\r\n\r\n.dot\r\nx\r\n.\r\nstill text\r\n\r\n"
    )


def test_message_over_size_limit_is_552_after_the_end_and_nothing_stored():
    session = in_data(config=make_config(limits={"max_message_size": 100}))
    assert session.send(b"x" * 60 + b"\r\n") == b""
    assert session.send(b"y" * 60 + b"\r\n") == b""
    assert reply_codes(session.send(b".\r\n")) == ["552 5.3.4"]
    assert session.intake.messages[0].aborted and not session.intake.finished
    assert reply_codes(session.command("MAIL FROM:<a@b.c>")) == ["250 2.1.0"]


def test_declared_size_over_limit_is_552_at_mail():
    session = SMTPHarness(config=make_config(limits={"max_message_size": 100}))
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<a@b.c> SIZE=101")) == ["552 5.3.4"]
    assert reply_codes(session.command("MAIL FROM:<a@b.c> SIZE=100")) == ["250 2.1.0"]


def test_long_lines_are_stored_as_they_came():
    session = in_data()
    line = b"x" * 5000 + b"y" * 5000 + b"\r\n"
    session.send(b"Subject: long\r\n\r\n" + line[:5000])
    assert reply_codes(session.send(line[5000:] + b".\r\n")) == ["250 2.0.0"]
    assert session.intake.finished[0].body == b"Subject: long\r\n\r\n" + line


def test_line_over_the_limit_is_500_and_session_goes_on():
    session = in_data(config=make_config(limits={"max_text_line": 1000}))
    session.send(b"x" * 5000)
    session.send(b"y" * 5000 + b"\r\n")
    assert reply_codes(session.send(b".\r\n")) == ["500 5.5.2"]
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


def test_line_of_exactly_the_limit_is_fine():
    limited = make_config(limits={"max_text_line": 1000})
    session = in_data(config=limited)
    assert reply_codes(session.send(b"x" * 998 + b"\r\n.\r\n")) == ["250 2.0.0"]
    session = in_data(config=limited)
    assert reply_codes(session.send(b"x" * 999 + b"\r\n.\r\n")) == ["500 5.5.2"]


def test_line_limit_over_random_lines_and_pieces():
    """
    The limit (1000 octets with the CRLF) against its definition, for long
    lines first, last, in the middle of a piece and across pieces.
    """
    rng = random.Random(53214)
    for _ in range(150):
        lengths = [rng.choice([0, 5, 997, 998, 999, 1200, rng.randrange(1500)])
                   for _ in range(rng.randrange(1, 6))]
        text = b"".join(b"x" * n + b"\r\n" for n in lengths)
        session = in_data(config=make_config(limits={"max_text_line": 1000}))
        cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out = b"".join(session.send(piece) for piece in pieces) + session.send(b".\r\n")
        expected = "500 5.5.2" if max(lengths) + 2 > 1000 else "250 2.0.0"
        assert reply_codes(out) == [expected], (lengths, cuts)


def test_too_many_received_fields_is_a_loop():
    session = in_data(config=make_config(smtp={"max_received_headers": 3}))
    header = b"Received: from a by b; date\r\n" * 4
    assert reply_codes(session.send(header + b"\r\nbody\r\n.\r\n")) == ["554 5.4.6"]
    session = in_data(config=make_config(smtp={"max_received_headers": 3}))
    header = b"Received: from a by b; date\r\n" * 3
    body = b"Received: in the body does not count\r\n" * 5
    assert reply_codes(session.send(header + b"\r\n" + body + b".\r\n")) == ["250 2.0.0"]


def test_storage_failure_is_451():
    session = in_data()
    session.intake.fail = True
    assert reply_codes(session.send(b"x\r\n.\r\n")) == ["451 4.3.0"]


def test_reply_waits_for_durable_storage_and_input_pauses():
    session = in_data()
    session.intake.hold = True
    assert session.send(b"x\r\n.\r\nNOOP\r\n") == b""
    session.intake.pending[0].callback(None)
    assert reply_codes(session.read()) == ["250 2.0.0", "250 2.0.0"]


def test_client_leaving_mid_data_aborts():
    session = in_data()
    session.send(b"partial\r\n")
    session.lose()
    assert session.intake.messages[0].aborted


def test_received_field():
    session = in_data()
    session.send(b"Subject: x\r\n\r\nb\r\n.\r\n")
    data = session.intake.finished[0].data
    first = data.split(b"\r\n")[:3]
    assert first[0] == b"Received: from client.example.net ([203.0.113.9])"
    assert first[1].startswith(b"\tby mx.example.org (mailserver) with ESMTP id ")
    assert first[2] == b"\tfor <bob@example.org>; Thu, 01 Jan 1970 00:00:00 +0000"


def test_received_field_names_the_authenticated_sender_and_utf8():
    session = SMTPHarness(peer=LOOPBACK, role="submission")
    session.ehlo()
    session.login()
    session.send(
        "MAIL FROM:<bob@example.org> SMTPUTF8\r\nRCPT TO:<a@remote.net>\r\n"
        "RCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\n"
    )
    data = session.intake.finished[0].data
    assert b"\t(Authenticated sender: bob@example.org)\r\n" in data
    assert b" with UTF8SMTPA id " in data
    assert b"\tfor <" not in data


def test_envelope_carries_dsn_body_and_size():
    session = SMTPHarness()
    session.ehlo()
    session.send(
        "MAIL FROM:<a@remote.net> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME SIZE=10\r\n"
        "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@example.org\r\n"
        "RCPT TO:<list@example.org> NOTIFY=NEVER\r\nDATA\r\n\xe4\r\n.\r\n"
    )
    envelope = session.intake.finished[0].envelope
    assert (envelope.ret, envelope.envid, envelope.body, envelope.size) == ("HDRS", "QQ+2B1", "8BITMIME", 10)
    first, second = envelope.recipients
    assert first.notify == ("SUCCESS", "DELAY") and first.orcpt == "rfc822;bob@example.org"
    assert second.destinations == ("bob@example.org", "alice@example.org") and second.notify == ("NEVER",)
    assert envelope.client_address == "203.0.113.9" and envelope.helo == "client.example.net"


def test_utf8_addresses_need_the_smtputf8_parameter():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<zoë@remote.net>")) == ["553 5.6.7"]
    session.command("MAIL FROM:<a@remote.net>")
    assert reply_codes(session.command("RCPT TO:<jürgen@example.org>")) == ["553 5.6.7"]
    session.command("RSET")
    assert reply_codes(session.command("MAIL FROM:<zoë@remote.net> SMTPUTF8")) == ["250 2.1.0"]
    assert reply_codes(session.command("RCPT TO:<Jürgen@example.org>")) == ["250 2.1.5"]
    session.send("DATA\r\nx\r\n.\r\n")
    envelope = session.intake.finished[0].envelope
    assert envelope.smtputf8 and envelope.recipients[0].destinations == ("jürgen@example.org",)


# BDAT / CHUNKING (RFC 3030)


def in_transaction() -> SMTPHarness:
    session = SMTPHarness()
    session.ehlo()
    session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    return session


def test_bdat_chunks_and_last():
    session = in_transaction()
    out = session.send(b"BDAT 4\r\nab\r\nBDAT 7 LAST\r\n.cd\r\n\r\n")
    assert reply_codes(out) == ["250 2.0.0", "250 2.0.0"]
    assert out.split(b"\r\n")[1].startswith(b"250 2.0.0 Ok: queued as")
    assert session.intake.finished[0].body == b"\r\nab\r\n.cd\r\n\r\n"


def test_bdat_octets_split_across_reads_and_may_look_like_commands():
    session = in_transaction()
    assert session.send(b"BDAT 16 LAST\r\nQUIT\r\n") == b""
    assert reply_codes(session.send(b"RSET\r\n")) == []
    assert reply_codes(session.send(b"..\r\n")) == ["250 2.0.0"]
    assert session.intake.finished[0].body == b"\r\nQUIT\r\nRSET\r\n..\r\n"


def test_bdat_zero_last_ends_the_message():
    session = in_transaction()
    assert reply_codes(session.send(b"BDAT 3\r\nx\r\nBDAT 0 LAST\r\n")) == ["250 2.0.0", "250 2.0.0"]
    assert session.intake.finished[0].body == b"\r\nx\r\n"


def test_bdat_without_transaction_reads_and_discards_the_chunk():
    session = SMTPHarness()
    session.ehlo()
    assert reply_codes(session.send(b"BDAT 4\r\nNOOP")) == ["503 5.5.1"]
    assert reply_codes(session.command("NOOP")) == ["250 2.0.0"]


def test_bdat_bad_syntax_and_mixing_with_data():
    session = in_transaction()
    assert reply_codes(session.command("BDAT")) == ["501 5.5.4"]
    assert reply_codes(session.command("BDAT x")) == ["501 5.5.4"]
    assert reply_codes(session.command("BDAT 1 FIRST")) == ["501 5.5.4"]
    assert reply_codes(session.send(b"BDAT 1\r\nx")) == ["250 2.0.0"]
    assert reply_codes(session.command("DATA")) == ["503 5.5.1"]
    assert reply_codes(session.command("RSET")) == ["250 2.0.0"]
    assert session.intake.messages[0].aborted


def test_bdat_over_the_size_limit():
    session = SMTPHarness(config=make_config(limits={"max_message_size": 10}))
    session.ehlo()
    session.send("MAIL FROM:<a@remote.net>\r\nRCPT TO:<bob@example.org>\r\n")
    assert reply_codes(session.send(b"BDAT 20\r\n" + b"x" * 18 + b"\r\n")) == ["552 5.3.4"]
    assert reply_codes(session.send(b"BDAT 2 LAST\r\nab")) == ["503 5.5.1"]
    assert not session.intake.finished


def test_one_log_line_per_transaction_and_rejections_counted():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = SMTPHarness(config=make_config(smtp={"bare_newline": "reject"}))
        session.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.org>\r\n")
        session.send(b"DATA\r\n")
        session.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
        session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        out = session.send(b"Subject: y\r\n\r\nfine\r\n.\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("event") in ("smtp.accepted", "smtp.rejected")]
    assert [e["event"] for e in lines] == ["smtp.rejected", "smtp.accepted"]
    assert lines[0]["reason"] == "bare-newline"
    refused, stored = session.intake.messages
    assert lines[0]["id"] == refused.envelope.id and lines[1]["id"] == stored.envelope.id
    assert f"queued as {stored.envelope.id}".encode() in out
    for event in lines:
        assert event["client"] and event["helo"] == "client.test"
        assert event["sender"] == "a@remote.test" and list(event["recipients"]) == ["bob@example.org"]
    assert lines[1]["size"] == len(b"Subject: y\r\n\r\nfine\r\n") and lines[1]["ms"] >= 0
    metrics = session.factory.dependencies.metrics
    assert metrics.smtp_refusals_total.value(role="smtp", reason="bare-newline") == 1
    assert metrics.smtp_messages_accepted_total.value(role="smtp") == 1


# C1 controls (NEL ends a line for many readers), the line separator and the
# right-to-left override: valid UTF-8 the grammar lets through.
HOSTILE = "\u0085\u2028\u202e\u009b"


def test_client_text_is_escaped_in_the_log_line_and_the_received_field():
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = SMTPHarness(aliases={f"to{HOSTILE}@example.org": ("bob@example.org",)})
        session.command(f"EHLO helo{HOSTILE}.test")
        session.send(
            f"MAIL FROM:<from{HOSTILE}@remote.test> SMTPUTF8\r\n"
            f"RCPT TO:<to{HOSTILE}@example.org>\r\nDATA\r\nx\r\n.\r\n"
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    (stored,) = session.intake.finished
    assert stored.envelope.helo == f"helo{HOSTILE}.test"  # kept as given for the checks
    [event] = [e for e in events if e.get("event") == "smtp.accepted"]
    text = formatEvent(event)
    assert text.isprintable(), text
    assert "helo=helo????.test" in text and "from=<from????@remote.test>" in text
    assert "to=<to????@example.org>" in text
    received = stored.data.split(b"\r\n")[:3]
    assert received[0] == b"Received: from helo????.test ([203.0.113.9])"
    assert received[2].startswith(b"\tfor <to????@example.org>; ")
