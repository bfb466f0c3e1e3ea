"""
Relay domains (backup MX, gateway): the RCPT decision for them, their list
of valid recipients (relay.relay_recipients), and the configuration keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from mailserver.cli import main
from mailserver.config import Config, ConfigError, Relay, load
from mailserver.from_config import accounts_for
from mailserver.relay_recipients import parse_relay_recipients
from mailserver.smtp.grammar import Mailbox, parse_mailbox
from mailserver.smtp.policy import Policy

RECIPIENTS = """\
# the gateway's users
Alice@Inside.test
bob@inside.test
@open.test
carol@elsewhere.test
not an address
@bad_domain!
"""


def test_the_recipients_file_and_its_bad_lines():
    path = Path("/etc/relay_recipients")
    listed, problems = parse_relay_recipients(
        RECIPIENTS, path, ("inside.test", "open.test", "free.test"))
    assert [str(p) for p in problems] == [
        "/etc/relay_recipients:5: 'carol@elsewhere.test': elsewhere.test is not one of "
        "relay.relay_domains",
        "/etc/relay_recipients:6: 'not an address' is not an address (user@domain)",
        "/etc/relay_recipients:7: '@bad_domain!': the domain is not a host name (letters, "
        "digits, hyphens and dots)",
    ]
    assert listed.accepts("alice@inside.test") and listed.accepts("BOB@INSIDE.TEST")
    assert listed.accepts("bob+lists@inside.test", "+")
    assert not listed.accepts("bob+lists@inside.test", "")
    assert not listed.accepts("mallory@inside.test", "+")
    assert listed.accepts("anyone@open.test")  # @open.test: all of its users
    assert listed.accepts("anyone@free.test")  # no line: every recipient


def config_for(tmp_path, **relay) -> Config:
    return Config(hostname="mx2.test", data_dir=str(tmp_path / "data"),
                  local_domains=("example.org",), relay=Relay(**relay))


def policy(config, role="smtp") -> Policy:
    accounts = accounts_for(config)
    if not accounts.users():
        accounts.add_user("bob@example.org", "x")
    return Policy(config, role, accounts)


def test_a_relay_domain_is_accepted_from_anyone_and_kept_for_the_queue(tmp_path):
    p = policy(config_for(tmp_path, relay_domains=("primary.test",)))
    assert p.recipient(Mailbox("Someone", "Primary.Test"), None) == ("Someone@Primary.Test",)
    assert p.recipient(Mailbox("Someone", "primary.test."), None) == ("Someone@primary.test.",)
    # Not its subdomains, nor other domains, nor address literals.
    for address in ("x@sub.primary.test", "x@primary.test.evil.net", "x@[192.0.2.1]"):
        answer = p.recipient(parse_mailbox(address), None)
        assert (answer.code, answer.enhanced) == (554, "5.7.1"), address
    # Local domains still resolve as before.
    assert p.recipient(Mailbox("bob", "example.org"), None) == ("bob@example.org",)
    # Submission still wants AUTH first.
    answer = policy(config_for(tmp_path, relay_domains=("primary.test",)), "submission").recipient(
        Mailbox("someone", "primary.test"), None)
    assert answer.code == 530


def test_a_gateway_refuses_unknown_users_at_rcpt_even_when_authenticated(tmp_path):
    listing = tmp_path / "relay_recipients"
    listing.write_text("known@inside.test\n")
    config = config_for(tmp_path, relay_domains=("inside.test", "other.test"),
                        relay_recipients=str(listing))
    p = policy(config)
    assert p.recipient(Mailbox("known", "inside.test"), None) == ("known@inside.test",)
    assert p.recipient(Mailbox("known+tag", "inside.test"), None) == ("known+tag@inside.test",)
    for authenticated in (None, "bob@example.org"):
        answer = p.recipient(Mailbox("unknown", "inside.test"), authenticated)
        assert (answer.code, answer.enhanced) == (550, "5.1.1")
    assert p.recipient(Mailbox("anyone", "other.test"), None) == ("anyone@other.test",)
    # The running server sees a change of the file at once.
    listing.write_text("known@inside.test\nnew@inside.test\n# more to come\n")
    assert p.recipient(Mailbox("new", "inside.test"), None) == ("new@inside.test",)


def test_the_keys_are_checked(tmp_path):
    def loaded(text: str):
        path = tmp_path / "c.toml"
        path.write_text('local_domains = ["example.org"]\n[relay]\n' + text)
        return load(path)

    config = loaded('relay_domains = ["primary.test"]\nown_names = ["MX2.Example.NET."]\n'
                    'own_addresses = ["192.0.2.7", "2001:DB8::7"]\n')
    assert config.relay.relay_domains == ("primary.test",)
    assert config.relay.own_names == ("mx2.example.net",)
    assert config.relay.own_addresses == ("192.0.2.7", "2001:db8::7")
    assert config.relay_recipients_path is None
    for text, problem in [
        ('relay_domains = ["example.org"]', "'example.org' is one of local_domains too"),
        ('relay_domains = ["Primary.test"]', "must be a lower-case domain name"),
        ('relay_recipients = "/nonexistent/list"', "cannot read /nonexistent/list"),
        ('own_addresses = ["mx2.example.net"]', "is not an IP address"),
        ('own_names = ["not a name"]', "is not a host name"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            loaded(text + "\n")


def test_bad_recipient_lines_are_logged_and_fail_check_config(tmp_path, capsys):
    listing = tmp_path / "relay_recipients"
    listing.write_text("ok@primary.test\nwho@else.test\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'data_dir = "{tmp_path / "data"}"\nlocal_domains = ["example.org"]\n'
                    f'[relay]\nrelay_domains = ["primary.test"]\n'
                    f'relay_recipients = "{listing}"\n')
    assert main(["check-config", str(toml)]) == 1
    assert capsys.readouterr().err == (
        f"mailserver: {listing}:2: 'who@else.test': else.test is not one of "
        "relay.relay_domains\n")
    accounts = accounts_for(load(toml))
    with capturedLogs() as events:
        assert accounts.is_relay_recipient("ok@primary.test")
        assert not accounts.is_relay_recipient("who@primary.test")
    [event] = [e for e in events if e.get("event") == "accounts.bad_line"]
    assert (event["file"], event["line"]) == (str(listing), 2)
    listing.write_text("ok@primary.test\n")
    assert main(["check-config", str(toml)]) == 0


def test_the_accounts_know_the_relay_domains(tmp_path):
    assert dataclasses.asdict(Relay())["relay_domains"] == ()
    accounts = accounts_for(config_for(tmp_path, relay_domains=("primary.test",)))
    assert accounts.is_relay_domain("Primary.Test.") and not accounts.is_relay_domain("x.test")
    assert not accounts_for(config_for(tmp_path)).is_relay_domain("primary.test")
