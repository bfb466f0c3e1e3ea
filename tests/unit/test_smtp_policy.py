"""
The SMTP policy: relay rules, roles, VRFY/EXPN, without a connection.
"""

import pytest

from mailserver.smtp.grammar import Mailbox, parse_mailbox
from mailserver.smtp.policy import Policy
from mailserver.smtp.replies import Reply
from mailserver.testing import FakeAccounts, make_config


def policy(role="smtp", **smtp):
    config = make_config(smtp=smtp)
    accounts = FakeAccounts(config, ["bob@example.org"], {"team@example.org": ("bob@example.org", "x@remote.net")})
    return Policy(config.smtp, role, accounts)


def test_local_recipient_resolves():
    assert policy().recipient(Mailbox("Bob", "example.org"), None) == ("bob@example.org",)
    assert policy().recipient(Mailbox("team", "example.org"), None) == ("bob@example.org", "x@remote.net")


def test_unknown_local_recipient_is_550_5_1_1():
    answer = policy().recipient(Mailbox("nobody", "example.org"), None)
    assert (answer.code, answer.enhanced) == (550, "5.1.1")


@pytest.mark.parametrize(
    "address",
    ["user@remote.net", "user@[192.0.2.1]", "user@[IPv6:2001:db8::1]", "bob@example.org.evil.net"],
)
def test_relaying_is_refused_to_strangers(address):
    answer = policy().recipient(parse_mailbox(address), None)
    assert (answer.code, answer.enhanced) == (554, "5.7.1")


def test_authenticated_clients_relay_as_given():
    assert policy().recipient(Mailbox("User", "remote.net"), "bob@example.org") == ("User@remote.net",)


def test_postmaster_goes_to_the_first_local_domain():
    p = policy()
    config = make_config()
    accounts = FakeAccounts(config, ["postmaster@example.org"])
    assert Policy(config.smtp, "smtp", accounts).recipient(Mailbox("postmaster", ""), None) == (
        "postmaster@example.org",
    )
    assert isinstance(p.recipient(Mailbox("postmaster", ""), None), Reply)


def test_submission_requires_auth_and_ownership():
    p = policy("submission")
    assert p.sender(Mailbox("bob", "example.org"), None).code == 530
    assert p.sender(Mailbox("bob", "example.org"), "bob@example.org") is None
    refused = p.sender(Mailbox("alice", "example.org"), "bob@example.org")
    assert (refused.code, refused.enhanced) == (553, "5.7.1")
    assert p.sender(None, "bob@example.org").code == 553


def test_mx_accepts_any_sender_including_null():
    assert policy().sender(None, None) is None
    assert policy().sender(Mailbox("x", "remote.net"), None) is None


def test_authenticated_sessions_must_own_the_sender_on_every_role():
    for role in ("smtp", "submission"):
        p = policy(role)
        refused = p.sender(Mailbox("ceo", "bigbank.example"), "bob@example.org")
        assert (refused.code, refused.enhanced) == (553, "5.7.1")
        assert p.sender(None, "bob@example.org").code == 553
        assert p.sender(Mailbox("Bob", "example.org"), "bob@example.org") is None


def test_auth_is_offered_on_submission_and_on_mx_only_when_configured():
    assert policy("submission").offers_auth
    assert not policy("smtp").offers_auth
    assert policy("smtp", mx_auth=True).offers_auth


def test_vrfy_and_expn_refused_to_strangers_by_default():
    p = policy()
    assert (p.vrfy(Mailbox("bob", "example.org"), None).code, p.vrfy(Mailbox("nobody", "example.org"), None).code) == (252, 252)
    assert p.expn(Mailbox("team", "example.org"), None).code == 502


def test_vrfy_and_expn_answer_when_configured_or_authenticated():
    p = policy(vrfy="answer", expn="answer")
    assert p.vrfy(Mailbox("bob", "example.org"), None).code == 250
    assert p.vrfy(Mailbox("nobody", "example.org"), None).code == 550
    assert p.vrfy(Mailbox("bob", ""), None).code == 250
    listed = policy().expn(Mailbox("team", "example.org"), "bob@example.org")
    assert listed.lines == ("<bob@example.org>", "<x@remote.net>")
    assert policy().expn(Mailbox("bob", "example.org"), "bob@example.org").code == 550


def test_unknown_role_is_refused():
    with pytest.raises(ValueError):
        policy("pop3")
