"""
The relay rules through the protocol: every classic open-relay trick is
refused, authenticated clients relay, the submission role needs AUTH.
"""

import pytest

from mailserver.testing import LOOPBACK, SMTPHarness, make_config, reply_codes

RELAY_TRICKS = [
    ("user%remote.net@example.org", "550 5.1.1"),
    ('"user@remote.net"@example.org', "550 5.1.1"),
    ("@example.org:user@remote.net", "554 5.7.1"),
    ("@example.org,@mx.example.org:user@remote.net", "554 5.7.1"),
    ("remote.net!user@example.org", "550 5.1.1"),
    ("user@remote.net@example.org", "501 5.1.3"),
    ("user@[192.0.2.1]", "554 5.7.1"),
    ("user@[127.0.0.1]", "554 5.7.1"),
    ("user@[IPv6:::1]", "554 5.7.1"),
    ("user@remote.net", "554 5.7.1"),
    ("user@example.org.remote.net", "554 5.7.1"),
    ("user@remote.net.", "554 5.7.1"),  # the absolute name is the same domain
    ('"user%remote.net"@example.org', "550 5.1.1"),
    ("bob%remote.net@example.org", "550 5.1.1"),
]


@pytest.mark.parametrize("address, expected", RELAY_TRICKS)
def test_relay_tricks_are_refused(address, expected):
    session = SMTPHarness()
    session.ehlo()
    session.command("MAIL FROM:<a@remote.net>")
    out = session.command(f"RCPT TO:<{address}>")
    assert reply_codes(out) == [expected]
    assert reply_codes(session.command("DATA")) == ["554 5.5.1"]
    assert not session.intake.messages


def test_authenticated_client_may_relay_on_mx_when_it_offers_auth():
    session = SMTPHarness(peer=LOOPBACK, config=make_config(smtp={"mx_auth": True}))
    session.ehlo()
    assert reply_codes(session.login()) == ["235 2.7.0"]
    session.send("MAIL FROM:<bob@example.org>\r\nRCPT TO:<Someone@Remote.NET>\r\nDATA\r\nx\r\n.\r\n")
    (recipient,) = session.intake.finished[0].envelope.recipients
    assert recipient.destinations == ("Someone@remote.net",)
    assert session.intake.finished[0].envelope.authenticated == "bob@example.org"


def test_authenticated_client_on_mx_must_own_the_sender():
    # Issue 19: AUTH on the MX role skipped the sender check submission makes.
    session = SMTPHarness(peer=LOOPBACK, config=make_config(smtp={"mx_auth": True}))
    session.ehlo()
    assert reply_codes(session.login()) == ["235 2.7.0"]
    out = session.command("MAIL FROM:<ceo@bigbank.example>")
    assert out == b"553 5.7.1 Sender address rejected: not owned by user bob@example.org\r\n"
    assert reply_codes(session.command("MAIL FROM:<>")) == ["553 5.7.1"]
    assert reply_codes(session.command("MAIL FROM:<bob+tag@example.org>")) == ["250 2.1.0"]
    assert reply_codes(session.command("RCPT TO:<victim@remote.example>")) == ["250 2.1.5"]


def test_subaddress_and_alias_resolution():
    session = SMTPHarness()
    session.ehlo()
    session.command("MAIL FROM:<a@remote.net>")
    assert reply_codes(session.command("RCPT TO:<bob+tag@example.org>")) == ["250 2.1.5"]
    assert reply_codes(session.command("RCPT TO:<list@EXAMPLE.org>")) == ["250 2.1.5"]
    session.send("DATA\r\nx\r\n.\r\n")
    recipients = session.intake.finished[0].envelope.recipients
    assert recipients[0].address == "bob+tag@example.org"
    assert recipients[0].destinations == ("bob@example.org",)
    assert recipients[1].destinations == ("bob@example.org", "alice@example.org")


def test_postmaster_is_accepted():
    session = SMTPHarness(users=("postmaster@example.org",))
    session.ehlo()
    session.command("MAIL FROM:<>")
    assert reply_codes(session.command("RCPT TO:<Postmaster>")) == ["250 2.1.5"]


def test_submission_requires_auth_before_mail():
    session = SMTPHarness(role="submission", peer=LOOPBACK)
    session.ehlo()
    assert reply_codes(session.command("MAIL FROM:<bob@example.org>")) == ["530 5.7.0"]
    session.login()
    assert reply_codes(session.command("MAIL FROM:<alice@example.org>")) == ["553 5.7.1"]
    assert reply_codes(session.command("MAIL FROM:<bob+x@example.org>")) == ["250 2.1.0"]
    assert reply_codes(session.command("RCPT TO:<friend@remote.net>")) == ["250 2.1.5"]


def test_submission_refuses_the_null_sender():
    session = SMTPHarness(role="submission", peer=LOOPBACK)
    session.ehlo()
    session.login()
    assert reply_codes(session.command("MAIL FROM:<>")) == ["553 5.7.1"]
